"""Config & model: the parameter table (trainable vs frozen by module, from the run's param_table
event; the audio tower frozen and removed after loading) and the resolved config — what the run
folder's config.toml holds, else the config the run reported in its run_info event."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from app.state import RunState
from app.text import assemble, data


def module_state(module: str, trainable: int, frozen: int, quantized: int) -> str:
    """trainable, partly (some of it trainable), removed (frozen, then dropped after loading: the audio
    tower), quantized (frozen, 4/8-bit), frozen."""
    if trainable:
        return "trainable" if not (frozen or quantized) else "partly"
    if "removed" in module:
        return "removed"
    return "quantized" if quantized else "frozen"


def count(n: int) -> str:
    """1,234 → 1.2k, 14,680,064 → 14.7M, 2,818,572,288 → 2.82B."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            v = n / div
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return str(n)


def value_text(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return str(v)


class ConfigView(Vertical):
    def compose(self) -> ComposeResult:
        yield Static(id="cfg-params-head", markup=False)
        yield DataTable(id="cfg-params", cursor_type="row", zebra_stripes=True)
        yield Static(id="cfg-head", markup=False)
        yield DataTable(id="cfg-table", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        self.query_one("#cfg-params", DataTable).add_columns("module", "state", "trainable", "frozen")
        self.query_one("#cfg-table", DataTable).add_columns("key", "value")
        self._params: dict | None = None
        self._config: tuple | None = None
        self.file_config: dict | None = None  # config.toml as last read well (None: not yet)
        self.file_error = ""  # what is wrong with it now ("": read well, or not there and never was)

    def show(self, s: RunState) -> None:
        if s.params != self._params:
            self._params = dict(s.params)
            table = self.query_one("#cfg-params", DataTable)
            table.clear()
            rows = s.params.get("rows") or []
            for r in rows:
                module, trainable, frozen, quantized = r.module, r.trainable, r.frozen, r.quantized
                table.add_row(data(module, limit=50), module_state(module, trainable, frozen, quantized),
                              count(trainable), count(frozen + quantized))
            trainable, total = s.params.get("trainable"), s.params.get("total")
            if rows and isinstance(trainable, int) and isinstance(total, int) and total > 0:
                head = (f"parameters: {trainable:,} trainable of {total:,} ({100 * trainable / total:.2f}%)")
            else:
                head = "parameters: no parameter table yet (the workers report it once the model is loaded)"
            self.query_one("#cfg-params-head", Static).update(assemble((head, "bold")))
        if self.file_config:  # as read now, or the last good copy (the file overwritten or gone since)
            config = self.file_config
            source = f"config.toml as last read (now: {self.file_error})" if self.file_error else "config.toml"
        else:
            config = s.config
            why = self.file_error or "no config.toml in the run folder"
            source = f"as the run reported it ({why})" if config else f"none yet ({why})"
        key = (source, tuple((k, repr(v)) for k, v in config.items()))
        if key != self._config:
            self._config = key
            table = self.query_one("#cfg-table", DataTable)
            table.clear()
            for k in config:
                table.add_row(data(k, limit=40), data(value_text(config[k]), limit=300))
            self.query_one("#cfg-head", Static).update(assemble(("resolved config: ", "bold"), data(source, limit=200)))
