"""The benchmark behind BENCHMARKS.md, importable: settings, timed runs, and the markdown of each part.

`scripts/benchmark.py` only parses flags and writes the file; it hands `scripts/run_ceag.py`'s recipe and steps
over as a `recipe.Recipe`. One module per concept:

- `settings`: the methods, targets, full and --quick defaults, the flags and their checks, each run's config
- `recipe`: what the benchmark needs from the run script (defaults, arguments, load_data, dense_model, prune_with)
- `default_run` (part 0), `methods` (part 1), `overhead` (part 2), `scaling` (part 3, with FairGRAPE's cost),
  `memory` (part 4), `generalisation` (part 5), `streaming_memory` (part 6): each part's runs and its markdown
- `timing`: the step timer and the timed fine-tuning runs; `profiling`: cProfile of a run, as markdown
- `machine`: machine, versions and commit; `formatting`: how a figure is written in a table
- `document`: the whole BENCHMARKS.md, its headline, the README's results block, the device-section block and
  the blocks that parts 5 and 6 write by their own commands
- `device`: the `--device_section` run and its section
"""
