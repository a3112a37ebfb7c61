"""``voxtui score``: metrics for a file of predictions beside their references, and the metrics table
that ``voxtui infer`` prints too."""

from __future__ import annotations

import sys

from engine.util import UsageError, counted, write_json


def score_rows(rows: list[dict]) -> dict:
    """Corpus metrics (``engine.eval.metrics``) of rows holding ``prediction`` and ``output``, with a
    bootstrap 95% interval."""
    from engine.eval import metrics

    preds = [r["prediction"] for r in rows]
    refs = [r["output"] for r in rows]
    out = metrics.corpus(preds, refs)
    out["ci95"] = metrics.bootstrap(preds, refs)
    return out


def render(m: dict) -> str:
    ci = m.get("ci95", {})

    def f(k, fmt="{:.4f}"):
        v = fmt.format(m[k])
        return v + (f" [{fmt.format(ci[k][0])}, {fmt.format(ci[k][1])}]" if k in ci else "")

    out = [f"{m.get('checkpoint', 'predictions')}: {counted(m['rows'], 'row')}",
           f"  ROUGE-L      {f('rougeL')}", f"  BLEU         {f('bleu', '{:.2f}')}",
           f"  Distinct-1   {f('distinct_1')}", f"  Distinct-2   {f('distinct_2')}",
           f"  exact match  {f('exact_match')}", f"  length ratio {m['length_ratio']:.3f}"]
    if "perplexity" in m:
        out.append(f"  perplexity   {m['perplexity']:.3f} ({m['tokens']} reference tokens)")
    return "\n".join(out)


def read_predictions(path: str) -> tuple[list[dict], list[dict]]:
    """The rows of a predictions file that hold string ``prediction`` and ``output``, and every other
    non-blank line as ``{"line", "reason", "detail"}`` (never raises on a bad row)."""
    import msgspec

    from engine.rows import _a_json_type, _json_type, iter_lines

    decoder = msgspec.json.Decoder()
    rows, bad = [], []
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        reason = detail = ""
        try:
            r = decoder.decode(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            reason, detail = "bad_encoding", f"invalid UTF-8 at byte {e.start}"
        except msgspec.DecodeError as e:
            reason, detail = "invalid_json", str(e)
        except RecursionError:
            reason, detail = "invalid_json", "nested too deeply"
        else:
            if not isinstance(r, dict):
                reason, detail = "not_object", f"a JSON {_json_type(r)}, not an object"
            else:
                for k in ("prediction", "output"):
                    if r.get(k) is None:
                        reason, detail = "missing_field", f"{k} (a string) is needed"
                        break
                    if not isinstance(r[k], str):
                        reason, detail = "wrong_type", f"{k} is {_a_json_type(r[k])}, not a string"
                        break
        if reason:
            bad.append({"line": lineno, "reason": reason, "detail": detail})
        else:
            rows.append(r)
    return rows, bad


BAD_ROWS_SHOWN = 20  # bad rows listed on stderr; the JSON report holds them all


def cmd_score(args) -> int:
    from engine.rows import check_outputs, open_checked

    open_checked(args.file)
    check_outputs({"the input": args.file}, {"--json": args.json})
    rows, bad = read_predictions(args.file)
    if not rows:
        if not bad:
            raise UsageError(f"{args.file}: no rows (the file is empty or holds only blank lines)")
        first = bad[0]
        raise UsageError(f"{args.file}: no row to score: {counted(len(bad), 'bad row')}; line {first['line']}: "
                         f"{first['reason']}: {first['detail']}")
    for b in bad[:BAD_ROWS_SHOWN]:
        print(f"{args.file}:{b['line']}: {b['reason']}: {b['detail']}", file=sys.stderr)
    if len(bad) > BAD_ROWS_SHOWN:
        print(f"{args.file}: … and {counted(len(bad) - BAD_ROWS_SHOWN, 'more bad row')} (--json lists them all)", file=sys.stderr)
    m = score_rows(rows)
    m["file"] = args.file
    m["bad_rows"] = bad
    if args.json:
        write_json(args.json, m)
    if args.json != "-":
        print(render(m))
        if bad:
            print(f"  skipped      {counted(len(bad), 'bad row')} (listed on stderr)")
    return 0
