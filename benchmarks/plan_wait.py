"""Reading the results of many Ray tasks, as ``preprocess`` reads its planning tasks' (16 inputs a
task: a million videos are 62,500 tasks), against the loop it had, which a user would write too:
``ray.wait(pending, num_returns=1)`` then ``ray.get`` of that one, until none is left. ``ray.wait``
scans every ref it is given, so that loop costs the square of the number of tasks.
``pipeline.run._every_result`` watches a window of the first ones left and reads every ended one
at once. Both read the same results (objects put in a private Ray instance on loopback, as a
finished task's are there), in one process.

    python benchmarks/plan_wait.py [--tasks 2000 8000] [--ours-tasks 62500]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, nargs="+", default=[2000, 8000], help="sizes for both loops")
    parser.add_argument("--ours-tasks", type=int, default=62_500, help="a larger size for ours only (0: none)")
    args = parser.parse_args()

    import ray

    from disco.pipeline.cluster import init_ray
    from disco.pipeline.run import _every_result

    init_ray(None, log=lambda message: None)

    def finished(count: int) -> list:  # results that are there: what the loops cost, not the tasks
        return [ray.put(k) for k in range(count)]

    def one_at_a_time(refs: list) -> list:  # the loop before
        results, pending = {}, list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            results[ready[0]] = ray.get(ready[0])
        return [results[ref] for ref in refs]

    def timed(read, refs) -> float:
        started = time.perf_counter()
        assert read(refs) == list(range(len(refs)))
        return time.perf_counter() - started

    try:
        for count in args.tasks:
            refs = finished(count)
            before, ours = timed(one_at_a_time, refs), timed(_every_result, refs)
            print(f"{count:7d} tasks: one at a time {before:7.2f} s, ours {ours:6.2f} s ({before / ours:6.1f}x); "
                  f"{count * 16:,} videos")
        if args.ours_tasks:
            refs = finished(args.ours_tasks)
            print(f"{args.ours_tasks:7d} tasks: ours {timed(_every_result, refs):6.2f} s; {args.ours_tasks * 16:,} videos "
                  "(one at a time: the square of the count, extrapolated from above)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
