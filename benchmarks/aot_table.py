"""The AOT (deviceless TPU compile) table, from the JSON reports of ``python -m diffusion_jax.aot``.

    python benchmarks/aot_table.py                       # benchmarks/results/aot_*.json
    python benchmarks/aot_table.py path/to/report.json ...

Prints one Markdown row per report: every figure is read from the JSON files,
none is typed here. Rows are ordered by config, topology, batch and remat.
"""

import argparse
import glob
import json
import os

GiB = 1024 ** 3
HEADER = ('| config | topology | devices | global batch | dtype | remat | compile s | '
          'TFLOP/device/step | GFLOP/image | memory GiB/device | HBM GiB/device | fits | '
          'images/s at 40% peak | images/s at 60% peak |')


def _config_name(report: dict) -> str:
  name = report.get('config') or ''
  return os.path.splitext(os.path.basename(name))[0] if name.endswith('.py') else name


def row(report: dict) -> str:
  """One Markdown row; a refused step shows the compiler's figure and no FLOPs."""
  fits = report['fits']
  memory = report['memory_per_device_bytes']
  if fits or report.get('flops_per_step') is not None:
    tflop = f'{report["flops_per_step"] / 1e12:.3f}'
    per_image = f'{report["flops_per_step"] / report["per_device_batch"] / 1e9:.2f}'
    mem = (f'{memory / GiB:.2f} ({report["argument_bytes"] / GiB:.2f} args + '
           f'{report["temp_bytes"] / GiB:.2f} temps)')
    ips = [f'{report[f"images_per_second_at_{p}pct"]:,.0f}' for p in (40, 60)]
  else:  # the compiler's RESOURCE_EXHAUSTED: its own figure of what it needed
    tflop = per_image = '—'
    what = report.get('memory_required_for') or 'the step'
    usable = report.get('available_hbm_bytes')
    mem = (f'{memory / GiB:.2f} needed for {what}' if memory else 'more than HBM')
    mem += f' ({usable / GiB:.2f} usable)' if usable else ''
    ips = ['—', '—']
  hbm = report['hbm_per_device_bytes']
  return (f'| {_config_name(report)} | {report["topology"]} | {report["devices"]} x '
          f'{report["device_kind"]} | {report["global_batch"]} | {report["dtype"]} | '
          f'{"yes" if report["remat"] else "no"} | {report["compile_seconds"]:.0f} | {tflop} | '
          f'{per_image} | '
          f'{mem} | {hbm / GiB:.2f} | {"yes" if fits else "**no**"} | {ips[0]} | {ips[1]} |')


def table(reports) -> str:
  key = lambda r: (_config_name(r), r['topology'], r['global_batch'], r['remat'])
  rows = [row(r) for r in sorted(reports, key=key)]
  return '\n'.join([HEADER, '|' + '---|' * HEADER.count(' | ') + '---|'] + rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  here = os.path.dirname(os.path.abspath(__file__))
  parser.add_argument('paths', nargs='*',
                      default=sorted(glob.glob(os.path.join(here, 'results', 'aot_*.json'))))
  args = parser.parse_args()
  reports = []
  for path in args.paths:
    with open(path) as f:
      reports.append(json.load(f))
  print(table(reports))


if __name__ == '__main__':
  main()
