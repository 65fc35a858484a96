"""The AOT (deviceless TPU compile) table, from the JSON reports of ``python -m diffusion_jax.aot``.

    python benchmarks/aot_table.py                       # benchmarks/results/aot_*.json
    python benchmarks/aot_table.py --short               # fewer columns
    python benchmarks/aot_table.py --update benchmarks/RESULTS.md [--short] [paths ...]

Prints one Markdown row per report: every figure is read from the JSON files,
none is typed here. Rows are ordered by config, topology, batch and remat.
``--update FILE`` replaces the table between the lines ``<!-- aot_table -->``
and ``<!-- /aot_table -->`` of FILE instead of printing it.
"""

import argparse
import glob
import json
import os
import re

GiB = 1024 ** 3
BEGIN, END = '<!-- aot_table -->', '<!-- /aot_table -->'


def _config_name(r: dict) -> str:
  name = r.get('config') or ''
  return os.path.splitext(os.path.basename(name))[0] if name.endswith('.py') else name


def _compiled(r: dict) -> bool:
  return r.get('flops_per_step') is not None


def _tflop(r):
  return f'{r["flops_per_step"] / 1e12:.3f}' if _compiled(r) else '—'


def _per_image(r):
  return f'{r["flops_per_step"] / r["per_device_batch"] / 1e9:.2f}' if _compiled(r) else '—'


def _memory(r, detail=True):
  """Per-device memory; for a refused step the compiler's own figure of what it needed."""
  memory = r['memory_per_device_bytes']
  if _compiled(r):
    parts = (f' ({r["argument_bytes"] / GiB:.2f} args + {r["temp_bytes"] / GiB:.2f} temps)'
             if detail else '')
    return f'{memory / GiB:.2f}{parts}'
  what = r.get('memory_required_for') or 'the step'
  usable = r.get('available_hbm_bytes')
  text = f'{memory / GiB:.2f} needed for {what}' if memory else 'more than HBM'
  return text + (f' ({usable / GiB:.2f} usable)' if usable else '')


def _images_per_second(pct):
  return lambda r: f'{r[f"images_per_second_at_{pct}pct"]:,.0f}' if _compiled(r) else '—'


COLUMNS = (
    ('config', _config_name, True),
    ('topology', lambda r: r['topology'], True),
    ('devices', lambda r: f'{r["devices"]} x {r["device_kind"]}', False),
    ('global batch', lambda r: str(r['global_batch']), True),
    ('dtype', lambda r: r['dtype'], False),
    ('remat', lambda r: 'yes' if r['remat'] else 'no', True),
    ('compile s', lambda r: f'{r["compile_seconds"]:.0f}', False),
    ('TFLOP/device/step', _tflop, True),
    ('GFLOP/image', _per_image, False),
    ('memory GiB/device', _memory, True),
    ('HBM GiB/device', lambda r: f'{r["hbm_per_device_bytes"] / GiB:.2f}', True),
    ('fits', lambda r: 'yes' if r['fits'] else '**no**', True),
    ('images/s at 40% peak', _images_per_second(40), True),
    ('images/s at 60% peak', _images_per_second(60), True),
)


def table(reports, short: bool = False) -> str:
  """The Markdown table of ``reports`` (all columns, or fewer with ``short``)."""
  columns = [(name, fn) for name, fn, in_short in COLUMNS if in_short or not short]
  if short:
    columns = [(n, (lambda r: _memory(r, detail=False)) if n == 'memory GiB/device' else fn)
               for n, fn in columns]
  key = lambda r: (_config_name(r), r['topology'], r['global_batch'], r['remat'])
  lines = ['| ' + ' | '.join(n for n, _ in columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(fn(r) for _, fn in columns) + ' |' for r in sorted(reports, key=key)]
  return '\n'.join(lines)


def remat_savings(reports) -> list:
  """One line per (config, topology, batch) compiled both with and without ``model.remat``."""
  by_key = {(_config_name(r), r['topology'], r['global_batch'], r['remat']): r
            for r in reports if _compiled(r)}
  lines = []
  for (name, topology, batch, remat), on in sorted(by_key.items()):
    off = by_key.get((name, topology, batch, False))
    if not remat or off is None:
      continue
    saved = off['memory_per_device_bytes'] - on['memory_per_device_bytes']
    temps = off['temp_bytes'] - on['temp_bytes']
    lines.append(
        f'- {name} on {topology}, global batch {batch}: model.remat saves '
        f'{saved / GiB:.2f} GiB per device ({100 * saved / off["memory_per_device_bytes"]:.0f}% '
        f'of {off["memory_per_device_bytes"] / GiB:.2f} GiB; temporaries '
        f'{off["temp_bytes"] / GiB:.2f} -> {on["temp_bytes"] / GiB:.2f} GiB, '
        f'-{temps / GiB:.2f}) for {100 * (on["flops_per_step"] / off["flops_per_step"] - 1):+.0f}% '
        f'FLOPs per step.')
  return lines


def update(path: str, text: str) -> None:
  """Replaces the block between BEGIN and END in the file at ``path`` with ``text``."""
  with open(path) as f:
    content = f.read()
  pattern = re.compile(re.escape(BEGIN) + r'\n.*?' + re.escape(END), re.S)
  if not pattern.search(content):
    raise SystemExit(f'{path} has no {BEGIN} ... {END} block')
  content = pattern.sub(lambda _: f'{BEGIN}\n{text}\n{END}', content)
  with open(path, 'w') as f:
    f.write(content)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  here = os.path.dirname(os.path.abspath(__file__))
  parser.add_argument('paths', nargs='*',
                      default=sorted(glob.glob(os.path.join(here, 'results', 'aot_*.json'))))
  parser.add_argument('--short', action='store_true',
                      help='fewer columns: no devices, dtype, compile time or memory breakdown')
  parser.add_argument('--update', help=f'replace the {BEGIN} block of this file '
                      '(benchmarks/RESULTS.md)')
  args = parser.parse_args()
  reports = []
  for path in args.paths:
    with open(path) as f:
      reports.append(json.load(f))
  text = '\n'.join([table(reports, short=args.short), ''] + remat_savings(reports)).strip()
  if args.update:
    update(args.update, text)
  else:
    print(text)


if __name__ == '__main__':
  main()
