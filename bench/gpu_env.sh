# Sourced by the GPU bench scripts: installs the carried wheels (.whl, see README) and sets PYTHONPATH.
OUT=${OUT:-./gpu-out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  # once per machine and set of wheels (two scripts started side by side must not install over each other)
  stamp="$(ls -l .whl | md5sum | cut -c1-32)"
  if [ "$(cat /tmp/site/.voxtui-wheels 2>/dev/null)" != "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && echo "$stamp" > /tmp/site/.voxtui-wheels
  fi
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
