"""Time ``segq recv`` draining a queue into /dev/null, a pipe, and with acknowledgements.

Usage: ``python -m benchmarks.cli_recv [--records N] [--repeats R] [--modes ...]``.
Each run is a fresh receiver name on one queue of N 100-byte lines, so every
run reads the same records; the figure is records per second of wall time
for the whole command (interpreter start-up included), median of the repeats.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import segq

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fill(path: str, records: int) -> None:
    line = b"x" * 99
    with segq.Sender(path) as sender:
        for start in range(0, records, 1000):
            sender.send_batch([line] * min(1000, records - start))


def _command(path: str, name: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "segq", "recv", path, "--name", name, *extra]


def _run(path: str, name: str, mode: str, batch: int | None) -> float:
    extra = [] if batch is None else ["--batch", str(batch)]
    env = {**os.environ, "PYTHONPATH": _ROOT}
    started = time.perf_counter()
    if mode == "devnull":
        with open(os.devnull, "wb") as devnull:
            subprocess.run(_command(path, name, extra), stdout=devnull, env=env, check=True)
    elif mode == "pipe":
        shell = " ".join(map(_quote, _command(path, name, extra))) + " | cat > /dev/null"
        subprocess.run(["sh", "-c", "set -e; " + shell], env=env, check=True)
    elif mode == "ack":
        # The reader acknowledges every line it read, in chunks, on the descriptor in argv[1].
        reader = (
            "import os,sys\n"
            "acks = int(sys.argv[1])\n"
            "while True:\n"
            "    data = os.read(0, 1 << 16)\n"
            "    if not data: break\n"
            "    os.write(acks, b'\\n' * data.count(b'\\n'))\n"
        )
        acks_read, acks_write = os.pipe()
        records_read, records_write = os.pipe()
        receiving = subprocess.Popen(
            _command(path, name, [*extra, "--ack-fd", str(acks_read)]),
            stdout=records_write,
            pass_fds=(acks_read,),
            env=env,
        )
        consuming = subprocess.Popen(
            [sys.executable, "-c", reader, str(acks_write)], stdin=records_read, pass_fds=(acks_write,), env=env
        )
        for fd in (acks_read, acks_write, records_read, records_write):
            os.close(fd)
        if receiving.wait() or consuming.wait():
            raise RuntimeError("a process of the acknowledged run failed")
    else:
        raise ValueError(mode)
    return time.perf_counter() - started


def _quote(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["devnull", "pipe"])
    parser.add_argument("--batch", type=int, default=None, help="pass --batch N to segq recv")
    options = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="segq-cli-recv-")
    try:
        path = os.path.join(directory, "q")
        _fill(path, options.records)
        run = 0
        for mode in options.modes:
            times = []
            for _ in range(options.repeats):
                times.append(_run(path, f"run{run}", mode, options.batch))
                run += 1
            median = statistics.median(times)
            print(
                f"{mode:8} batch={options.batch}: median {median:.3f} s, "
                f"{options.records / median:,.0f} records/s (runs: {', '.join(f'{t:.3f}' for t in times)})"
            )
    finally:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
