"""The quality-per-model-call table of docs/fast_sampling.md, from an eval part ``nfe_curve`` CSV.

    python benchmarks/nfe_table.py runs/digits/eval/nfe_curve.csv [--update docs/fast_sampling.md]

Prints a Markdown table (samplers as rows, model-call budgets as columns,
the classifier Fréchet distance and the sampling wall time in each cell, the
ODE rows with the calls they took) and, with ``--update``, replaces the text
between ``<!-- nfe_curve -->`` and ``<!-- /nfe_curve -->`` in that file.
"""

import argparse
import csv
import re

BEGIN, END = '<!-- nfe_curve -->', '<!-- /nfe_curve -->'


def markdown(rows: list[dict], metric: str = 'classifier_frechet_at_n') -> str:
  """The table; fixed-budget samplers on one row each, every ODE tolerance on its own."""
  fixed = [r for r in rows if not r['sampler'].startswith('ode')]
  budgets = sorted({float(r['nfe']) for r in fixed})
  lines = ['| sampler | ' + ' | '.join(f'{b:g} calls' for b in budgets) + ' |',
           '|---|' + '---|' * len(budgets)]
  for name in dict.fromkeys(r['sampler'] for r in fixed):
    cells = {float(r['nfe']): r for r in fixed if r['sampler'] == name}
    lines.append(f'| {name} | ' + ' | '.join(
        f'{float(cells[b][metric]):.1f} ({float(cells[b]["wall_s"]):.0f} s)' if b in cells else ''
        for b in budgets) + ' |')
  for r in rows:
    if r['sampler'].startswith('ode'):
      lines.append(f'| {r["sampler"]}: {float(r["nfe"]):.0f} calls, '
                   f'{float(r[metric]):.1f} ({float(r["wall_s"]):.0f} s) |' + ' |' * (len(budgets) - 1))
  real = {r.get('classifier_frechet_real_at_n') for r in rows} - {None, ''}
  n = {r['num_samples'] for r in rows}
  note = (f'\n({metric} of {", ".join(sorted(n))} samples per cell, sampling wall time in '
          f'brackets, compilation included'
          + (f'; real digits score {float(min(real)):.1f}' if real else '') + '.)')
  return '\n'.join(lines) + '\n' + note


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('csv')
  parser.add_argument('--update', help='a Markdown file with the nfe_curve markers (docs/fast_sampling.md)')
  args = parser.parse_args()
  with open(args.csv) as f:
    table = markdown(list(csv.DictReader(f)))
  print(table)
  if args.update:
    with open(args.update) as f:
      text = f.read()
    pattern = re.compile(re.escape(BEGIN) + '.*?' + re.escape(END), re.S)
    if not pattern.search(text):
      raise SystemExit(f'error: {args.update} has no {BEGIN} ... {END} markers.')
    with open(args.update, 'w') as f:
      f.write(pattern.sub(lambda _: f'{BEGIN}\n{table}\n{END}', text))


if __name__ == '__main__':
  main()
