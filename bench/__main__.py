"""`python -m bench [NAME ...] [OPTIONS]`: run the named benchmarks, by default all present.

OPTIONS go to every benchmark run; `python -m bench.NAME --help` lists those of one benchmark.
"""

from __future__ import annotations

import importlib
import sys

from bench import available


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks in turn; the exit code is the worst of theirs."""
    argv = sys.argv[1:] if argv is None else argv
    present = available()
    if argv[:1] in (["-h"], ["--help"]):
        print(f"{__doc__}\nBenchmarks here: {', '.join(present)}")
        return 0
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, options = argv[:split], argv[split:]
    unknown = [name for name in names if name not in present]
    if unknown:
        print(f"no benchmark {', '.join(unknown)}; there are: {', '.join(present)}")
        return 2
    code = 0
    for name in names or present:
        print(f"=== bench.{name} ===", flush=True)
        module = importlib.import_module(f"bench.{name}")
        code = max(code, module.main(options))
    return code


if __name__ == "__main__":
    sys.exit(main())
