"""python -m chatbot.load: many simultaneous users against a launched app, over real HTTP.

Each user is its own gradio_client Client (its own Gradio session, as a browser tab is) and asks
its questions one after another; each flooder fires all of its questions at once from one
session. Prints, per group, how many were answered, told to wait (the rate limits, or the
queue full) and failed, with the median and 95th-percentile latency of the answered ones.

Examples:
  python -m chatbot                                   # in another terminal: the app on :7860
  python -m chatbot.load --users 20                   # issue 10: 20 simultaneous users, all answered
  python -m chatbot.load --users 20 --flooders 1      # 19 users + 1 flooder: the 19 all answered,
                                                      # the flooder told to wait
  python -m chatbot.load --url http://127.0.0.1:7860 --users 5 --questions 3 --mode rag --json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

QUESTIONS = [
    "What does HTN mean?", "What is the door-to-balloon target for STEMI?", "What does SADMANS stand for?",
    "What is Cardivexin used for?", "What does AKI mean?",
]
# Words in the messages of chatbot.limits and of Gradio's full queue.
_WAIT_WORDS = ("wait", "queue is full", "limit")


@dataclass
class GroupResult:
    group: str
    asked: int = 0
    answered: int = 0
    told_to_wait: int = 0
    failed: int = 0
    latencies_s: list[float] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)  # one example of each refusal or failure

    def record(self, outcome: str, latency: float, message: str = "") -> None:
        self.asked += 1
        if outcome == "answered":
            self.answered += 1
            self.latencies_s.append(latency)
        elif outcome == "wait":
            self.told_to_wait += 1
        else:
            self.failed += 1
        if message and message not in self.messages and len(self.messages) < 3:
            self.messages.append(message)

    def median(self) -> float | None:
        return round(statistics.median(self.latencies_s), 2) if self.latencies_s else None

    def p95(self) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)  # nearest rank
        return round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 2)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m chatbot.load", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the launched app (default %(default)s)")
    parser.add_argument("--users", type=int, default=20, help="simultaneous users, flooders included (default 20)")
    parser.add_argument("--flooders", type=int, default=0, help="how many of them flood (default 0)")
    parser.add_argument("--flood", type=int, default=30, help="questions each flooder fires at once (default 30)")
    parser.add_argument("--questions", type=int, default=1, help="questions each ordinary user asks in turn (default 1)")
    parser.add_argument("--mode", default="base", choices=["hybrid", "rag", "finetuned", "base"],
                        help="answer mode (default base: the cheapest answer, the queue is what is measured)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds a question may take (default 600)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def _ask(client, question: str, mode: str, timeout: float) -> tuple[str, float, str]:
    started = time.perf_counter()
    try:
        result = client.submit(question, mode, None, api_name="/chat").result(timeout=timeout)
    except Exception as exc:  # gradio_client raises ValidationError, AppError, TimeoutError...
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        waited = any(w in str(exc).lower() for w in _WAIT_WORDS)
        return ("wait" if waited else "failed"), time.perf_counter() - started, message[:200]
    chat = result[1] if isinstance(result, (list, tuple)) and len(result) > 1 else []
    answer = chat[-1] if chat else {}
    text = "".join(part.get("text", "") for part in answer.get("content", []) if isinstance(part, dict)) \
        if isinstance(answer.get("content"), list) else str(answer.get("content", ""))
    if answer.get("role") == "assistant" and text.strip():
        return "answered", time.perf_counter() - started, ""
    return "failed", time.perf_counter() - started, "no answer in the result"


def run(args: argparse.Namespace) -> list[GroupResult]:
    import httpx
    from gradio_client import Client

    users = GroupResult("users")
    flooders = GroupResult("flooders")
    lock = threading.Lock()
    start = threading.Barrier(args.users)

    def user(index: int) -> None:
        # httpx's 5 s default would count a slow join on a loaded server as a failure; the
        # answer stream itself is kept alive by Gradio's heartbeats.
        client = Client(args.url, verbose=False, httpx_kwargs={"timeout": httpx.Timeout(120.0)})
        flooding = index < args.flooders
        start.wait()  # all connected, then all at once
        if flooding:
            jobs = [(time.perf_counter(), client.submit(QUESTIONS[i % len(QUESTIONS)], args.mode, None,
                                                         api_name="/chat")) for i in range(args.flood)]
            for began, job in jobs:
                outcome, message = "answered", ""
                try:
                    job.result(timeout=args.timeout)
                except Exception as exc:
                    message = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                    outcome = "wait" if any(w in str(exc).lower() for w in _WAIT_WORDS) else "failed"
                with lock:
                    flooders.record(outcome, time.perf_counter() - began, message[:200])
            return
        for turn in range(args.questions):
            outcome, latency, message = _ask(client, QUESTIONS[(index + turn) % len(QUESTIONS)], args.mode, args.timeout)
            with lock:
                users.record(outcome, latency, message)

    with ThreadPoolExecutor(max_workers=args.users) as pool:
        list(pool.map(user, range(args.users)))
    return [users, flooders] if args.flooders else [users]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if not 0 <= args.flooders <= args.users or args.users < 1:
        print("error: --flooders must be between 0 and --users, and --users at least 1", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results = run(args)
    elapsed = time.perf_counter() - started
    if args.json:
        print(json.dumps({"seconds": round(elapsed, 1), "groups": [
            {**{k: v for k, v in asdict(r).items() if k != "latencies_s"}, "median_s": r.median(), "p95_s": r.p95()}
            for r in results]}, indent=2))
        return 0
    print(f"{'group':<9} {'asked':>5} {'answered':>8} {'told-to-wait':>12} {'failed':>6} {'median s':>8} {'p95 s':>6}")
    for r in results:
        median, p95 = r.median(), r.p95()
        print(f"{r.group:<9} {r.asked:>5} {r.answered:>8} {r.told_to_wait:>12} {r.failed:>6} "
              f"{median if median is not None else '-':>8} {p95 if p95 is not None else '-':>6}")
        for message in r.messages:
            print(f"          e.g. {message}")
    print(f"({args.users} users, {args.flooders} flooding, {elapsed:.1f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
