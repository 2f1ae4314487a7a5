"""Where a test file spends its time: each case's wall time, slowest first.

Runs one absltest file in this process (as `python tests/<file>.py` would)
and times every test case, so CI time can be cut where it goes. Under JAX
most of a case's time is often eager op compilation (every op compiles once
per shape); `--profile` adds the functions with the most own time (cProfile),
which shows it (`backend_compile_and_load`).

  PYTHONPATH=.:tests KERAS_BACKEND=jax JAX_PLATFORMS=cpu \
    python benchmarks/test_cases.py tests/hierarchical_test.py [--profile] \
      [--top=25] [--json=results/test_cases.json] [-- test filters...]
"""

import argparse
import cProfile
import json
import pstats
import runpy
import sys
import time
import unittest


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_file")
    parser.add_argument("--top", type=int, default=25, help="cases (and functions) to print")
    parser.add_argument("--profile", action="store_true", help="also print cProfile's top")
    parser.add_argument("--json", help="write every case's time here")
    args, test_args = parser.parse_known_args()
    if test_args[:1] == ["--"]:
        test_args = test_args[1:]

    times = {}  # test id -> seconds
    run = unittest.TestCase.run

    def timed_run(self, result=None):
        start = time.perf_counter()
        try:
            return run(self, result)
        finally:
            times[self.id()] = time.perf_counter() - start

    unittest.TestCase.run = timed_run
    profile = cProfile.Profile() if args.profile else None
    sys.argv = [args.test_file, *test_args]
    start = time.perf_counter()
    if profile:
        profile.enable()
    try:
        runpy.run_path(args.test_file, run_name="__main__")  # absltest.main() exits
    except SystemExit as exit_:
        code = int(exit_.code or 0)  # absltest exits with a bool
    else:
        code = 0
    finally:
        if profile:
            profile.disable()
    total = time.perf_counter() - start

    slowest = sorted(times.items(), key=lambda item: -item[1])
    print(f"\n{args.test_file}: {len(times)} cases, {total:.1f} s in all "
          f"(cases {sum(times.values()):.1f} s; the rest is imports and set-up)")
    print(f"{'seconds':>8}  case")
    for name, seconds in slowest[: args.top]:
        print(f"{seconds:8.2f}  {name}")
    if profile:
        pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(args.top)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"test_file": args.test_file, "total_s": total, "exit_code": code,
                       "cases_s": dict(slowest)}, f, indent=1)
    sys.exit(code)


if __name__ == "__main__":
    main()
