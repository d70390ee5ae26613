#!/usr/bin/env python3
"""`make bench-serve`: `gpt2kit serve` under load.

Starts the server on a free loopback port and sends streamed completions (a prompt of
`--prompt-tokens` token ids, `--new-tokens` generated, `ignore_eos` so that every request
makes exactly that many) from 1, 4, 16 and 64 client threads at once, each on its own
connection (http.client, standard library only). Per level: aggregate generated tokens/s
(all completion tokens over the wall time from the first send to the last answer) and
time to first token (request sent → first `data:` chunk) p50 and p99. The same model
served one request at a time (`--max-num-seqs 1`) is the baseline. The float model runs
in fp32 and in bf16 (`--dtype bf16`), and `--int8` adds an int8 artifact. The load
generator shares the machine's cores with the server: its CPU time over the wall time is
reported.

usage: serve_bench.py --binary target/release/gpt2kit --model target/bench/gpt2-random \
           [--int8 DIR] [--no-bf16] [--out target/bench/serve.md]
"""
import argparse
import http.client
import json
import os
import random
import subprocess
import sys
import threading
import time


def start(binary, model, max_num_seqs, extra=()):
    p = subprocess.Popen(
        [binary, "serve", "--model", model, "--port", "0", "--max-num-seqs", str(max_num_seqs),
         "--max-queue", "4096", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline()
    if "http://" not in line:
        p.kill()
        sys.exit(f"the server did not start: {line!r}")
    host, port = line.split("http://")[1].split()[0].rsplit(":", 1)
    return p, host, int(port)


def cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(host, port, prompt, new_tokens):
    """One streamed request: (seconds to the first chunk, completion tokens)."""
    body = json.dumps({
        "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection(host, port, timeout=3600)
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    first, tokens = None, 0
    while True:
        line = r.readline()
        if not line:
            break
        if not line.startswith(b"data: "):
            continue
        if first is None:
            first = time.perf_counter() - sent
        data = line[6:].strip()
        if data == b"[DONE]":
            break
        usage = json.loads(data).get("usage")
        if usage:
            tokens = usage["completion_tokens"]
    conn.close()
    return first, tokens


def level(host, port, streams, requests, prompt_tokens, new_tokens, vocab, seed):
    """`requests` requests from `streams` threads; the level's numbers."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(prompt_tokens)] for _ in range(requests)]
    todo = list(range(requests))
    lock = threading.Lock()
    ttft, total, errors = [], [0], []

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            try:
                first, n = one(host, port, prompts[i], new_tokens)
            except Exception as e:  # reported, not fatal: the level shows how many failed
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                ttft.append(first)
                total[0] += n

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    ttft.sort()
    pick = lambda q: ttft[min(len(ttft) - 1, int(q * len(ttft)))] if ttft else float("nan")
    return {
        "streams": streams, "requests": requests, "tokens": total[0], "wall": wall,
        "tok_s": total[0] / wall, "ttft_p50": pick(0.5), "ttft_p99": pick(0.99),
        "client_cpu": client_cpu / wall, "errors": len(errors),
    }


def run(binary, model, label, max_num_seqs, levels, args, extra=()):
    p, host, port = start(binary, model, max_num_seqs, extra)
    try:
        one(host, port, list(range(args.prompt_tokens)), 4)  # warm-up
        rows = []
        for streams in levels:
            requests = max(streams, args.min_requests)
            c0 = cpu_seconds(p.pid)
            r = level(host, port, streams, requests, args.prompt_tokens, args.new_tokens,
                      args.vocab, seed=streams)
            r["server_cpu"] = (cpu_seconds(p.pid) - c0) / r["wall"]
            r["label"], r["max_num_seqs"] = label, max_num_seqs
            print(json.dumps(r), flush=True)
            rows.append(r)
        return rows
    finally:
        p.terminate()
        p.wait()


def prefix_rows(binary, model, args):
    """One stream; prompts of a shared `--prefix-tokens` preamble and 16 tokens of their
    own, each generating 8: time to first token with `--prefix-cache-mb` against without.
    The first request (which fills the cache) is a warm-up in both."""
    rng = random.Random(11)
    preamble = [rng.randrange(args.vocab) for _ in range(args.prefix_tokens)]
    prompts = [preamble + [rng.randrange(args.vocab) for _ in range(16)] for _ in range(6)]
    rows = []
    for label, extra in [("off", []), ("on", ["--prefix-cache-mb", "256"])]:
        p, host, port = start(binary, model, 1, extra)
        try:
            one(host, port, prompts[0], 8)
            ttft = sorted(one(host, port, q, 8)[0] for q in prompts[1:])
        finally:
            p.terminate()
            p.wait()
        rows.append({"cache": label, "ttft_p50": ttft[len(ttft) // 2], "ttft_min": ttft[0],
                     "requests": len(ttft)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default="target/release/gpt2kit")
    ap.add_argument("--model", required=True, help="the float bench model")
    ap.add_argument("--int8", help="an int8 artifact of it (int8-dynamic), benched too")
    ap.add_argument("--streams", default="1,4,16,64")
    ap.add_argument("--baseline-streams", default="1,4,16",
                    help="levels for the one-request-at-a-time server (its rate does not "
                         "change with streams; only the waiting grows)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-requests", type=int, default=4,
                    help="requests per level at least (a level sends max(streams, this))")
    ap.add_argument("--vocab", type=int, default=50000, help="prompt token ids below this")
    ap.add_argument("--prefix-tokens", type=int, default=512,
                    help="the shared preamble of the prefix-cache rows")
    ap.add_argument("--only-prefix", action="store_true", help="just the prefix-cache rows")
    ap.add_argument("--no-bf16", action="store_true",
                    help="leave out the float model served in bf16 (`--dtype bf16`)")
    ap.add_argument("--out", help="markdown table written here too")
    args = ap.parse_args()
    streams = [int(s) for s in args.streams.split(",")]
    base_streams = [int(s) for s in args.baseline_streams.split(",")]
    models = [("fp32", args.model, [])]
    if not args.no_bf16:
        models.append(("bf16", args.model, ["--dtype", "bf16"]))
    if args.int8:
        models.append(("int8-dynamic", args.int8, []))
    rows = []
    for label, model, extra in ([] if args.only_prefix else models):
        rows += run(args.binary, model, label, max(streams), streams, args, extra)
        rows += run(args.binary, model, label, 1, base_streams, args, extra)
    prefix = prefix_rows(args.binary, args.model, args)
    lines = [
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (ignore_eos), "
        f"greedy, streamed; {os.cpu_count()} CPUs",
        "",
        "| model | server | streams | requests | generated tok/s | TTFT p50 s | TTFT p99 s "
        "| client CPU (of one core) | server CPU (of one core) | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        server = "one at a time" if r["max_num_seqs"] == 1 else f"--max-num-seqs {r['max_num_seqs']}"
        lines.append(
            f"| {r['label']} | {server} | {r['streams']} | {r['requests']} | {r['tok_s']:.1f} "
            f"| {r['ttft_p50']:.3f} | {r['ttft_p99']:.3f} | {100 * r['client_cpu']:.1f}% "
            f"| {100 * r['server_cpu']:.0f}% | {r['errors']} |")
    if not rows:
        lines = []
    off, on = prefix
    lines += [
        "",
        f"shared {args.prefix_tokens}-token preamble + 16 own tokens, 8 new, one stream, fp32 "
        f"({on['requests']} requests after one that fills the cache)",
        "",
        "| prefix cache | TTFT p50 s | TTFT min s |",
        "|---|---|---|",
        f"| off | {off['ttft_p50']:.3f} | {off['ttft_min']:.3f} |",
        f"| on (`--prefix-cache-mb 256`) | {on['ttft_p50']:.3f} | {on['ttft_min']:.3f} |",
        f"| ratio (off / on) | {off['ttft_p50'] / on['ttft_p50']:.1f}× | |",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
