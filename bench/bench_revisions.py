"""Two revisions of this app served side by side: is a change faster, measured where the machine's noise can't fake it.

    python bench/bench_revisions.py e7d3853 --avx2      # that commit against the working tree

Checks the given revision out into a temporary git worktree, starts `python app.py` from it and from this checkout
(default settings, same Python environment), and runs bench_speed's chat load (streamed OpenAI chat, 64 new tokens)
at 16 clients and at one in rounds that alternate which server goes first. Each round's ratio pairs the two servers
in that round, and the median of the rounds is printed: on a shared machine whose speed swings by 1.75x within
minutes, a ratio of two separate runs says little.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_server import Server  # noqa: E402
from bench.bench_speed import chat_level  # noqa: E402
from bench.machine import cap_kernels_at_avx2, cpu_description  # noqa: E402

LEVELS = {16: 32, 1: 6}  # clients: requests per round


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a git revision (commit, tag, branch) to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--avx2", action="store_true", help="cap every kernel at AVX2, as on a CPU without AVX-512")
    args = parser.parse_args()
    if args.avx2:
        cap_kernels_at_avx2()
    print(cpu_description(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as folder:
        tree = Path(folder) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True)
        servers: dict[str, Server] = {}
        try:
            servers["before"] = Server(f"before ({args.before})", {"MAX_BATCH_SIZE": "32"}, root=tree)
            servers["after"] = Server("after (working tree)", {"MAX_BATCH_SIZE": "32"})
            speeds: dict[tuple[str, int], list[float]] = {(side, c): [] for side in servers for c in LEVELS}
            for round_index in range(args.rounds):
                order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
                for clients, requests in LEVELS.items():
                    for side in order:
                        level = asyncio.run(chat_level(servers[side], clients, requests))
                        speeds[(side, clients)].append(level.tokens_per_s)
            for clients in LEVELS:
                pairs = zip(speeds[("after", clients)], speeds[("before", clients)], strict=True)
                ratios = [after / before for after, before in pairs]
                print(
                    f"{clients} clients: after / before {statistics.median(ratios):.3f} (rounds: "
                    + ", ".join(f"{ratio:.2f}" for ratio in ratios)
                    + f"); tokens/s after {statistics.median(speeds[('after', clients)]):.1f}, "
                    f"before {statistics.median(speeds[('before', clients)]):.1f}",
                    flush=True,
                )
        finally:
            for server in servers.values():
                server.stop()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
