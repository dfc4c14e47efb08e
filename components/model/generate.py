"""Text generation with a KV cache, and the `kubellm generate` command.

    kubellm generate --model out/pretrain/<hash>/hf --chat "What is the capital of Zorbia?"
    kubellm generate --model s3://bucket/kubellm/sft/<hash> --prompt "Once upon" --temperature 0.8 --top-p 0.9

`--model` is a plain local Hugging Face directory or an artifact (an S3/local prefix with a
`_manifest.json`, or a manifest JSON file); an artifact is downloaded and sha256-verified into a
temporary directory first — also a local directory whose HF files sit beside its `_manifest.json`
(a directory with a manifest is never read as a plain one). Python:

    from kubellm.model.generate import load_for_generation, chat
    bundle = load_for_generation("out/hf")
    print(chat(bundle, [{"role": "user", "content": "hi"}], max_new_tokens=32))
"""

from __future__ import annotations

import argparse
import logging
import math
import numbers
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kubellm.core.errors import ConfigError, InputDataError, KubellmError
from kubellm.core.manifest import is_plain_hf_dir
from kubellm.model.checks import check_token_ids
from kubellm.model.hf import INDEX_NAME, WEIGHTS_NAME, end_of_turn_id, read_json
from kubellm.model.transformer import Transformer

log = logging.getLogger(__name__)


def check_sampling(temperature: float, top_p: float, names: tuple[str, str] = ("temperature", "top_p")
                   ) -> None:
    """Raise `ConfigError` (naming the parameter as `names` spells it) unless temperature is a finite
    number >= 0 and 0 < top_p <= 1 (NaN fails both)."""
    t_name, p_name = names
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"{t_name}={temperature!r}: expected a finite number >= 0 (0 = greedy)")
    if not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ConfigError(f"{p_name}={top_p!r}: expected a number in (0, 1] (1 = no nucleus cut)")


def check_max_new_tokens(max_new_tokens: int, name: str = "max_new_tokens") -> None:
    """Raise `ConfigError` (naming the parameter as `name` spells it) unless max_new_tokens is an
    integer >= 0."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ConfigError(f"{name}={max_new_tokens!r}: expected an integer >= 0")


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of `logits` (B, V): greedy when temperature == 0, else sampling from the
    smallest set of tokens whose probability reaches top_p (nucleus), at least one token kept.
    `ConfigError` unless temperature is finite and >= 0 and 0 < top_p <= 1."""
    check_sampling(temperature, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # shift by the row max first: a tiny temperature then gives -inf (probability 0), never inf/nan
    probs = torch.softmax((logits - logits.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the mass *before* it already reaches top_p (so the top token always stays)
        sorted_p[(sorted_p.cumsum(dim=-1) - sorted_p) >= top_p] = 0.0
        return order.gather(-1, _multinomial(sorted_p, generator)).squeeze(-1)
    return _multinomial(probs, generator).squeeze(-1)


def _multinomial(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row; where the generator lives on another device than `probs` (a CPU generator
    for a CUDA model), drawn there, so a seed gives the same tokens on either device."""
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model: Transformer, input_ids: torch.Tensor | Sequence[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_ids: Sequence[int] = (),
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each row of `input_ids` ((B, T) or one list of ids; rows of equal length) with
    incremental decoding through a KV cache: one prefill pass, then one token per step. Returns the
    new tokens per row, cut before the first stop token. Stops early when every row has stopped.
    A prompt that is empty or leaves no room in the context raises `InputDataError`; bad sampling
    parameters or a negative `max_new_tokens` `ConfigError` (see `check_sampling`,
    `check_max_new_tokens`)."""
    check_max_new_tokens(max_new_tokens)
    check_sampling(temperature, top_p)
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    cfg = model.cfg
    device = model.tok_embeddings.weight.device
    ids = ids.to(device)
    B, T = ids.shape
    if T == 0:
        raise InputDataError("prompt: empty; generation needs at least one token (e.g. bos)")
    check_token_ids(ids, cfg.vocab_size, where="prompt")
    if T >= cfg.max_seq_len:
        raise InputDataError(f"prompt: {T} tokens leave no room in the context (the model's max_seq_len is "
                             f"{cfg.max_seq_len}); shorten it to at most {cfg.max_seq_len - 1} tokens")
    budget = min(max_new_tokens, cfg.max_seq_len - T)
    if budget < max_new_tokens:
        log.warning("max_new_tokens=%d capped to %d by max_seq_len=%d", max_new_tokens, budget, cfg.max_seq_len)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_kv_cache(B, max_len=T + budget)
        logits = model(ids, kv_cache=cache)[:, -1]  # prefill: (B, V)
        stops = torch.tensor(list(eos_token_ids) or [-1], device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        out: list[torch.Tensor] = []
        for step in range(budget):
            nxt = sample_next(logits, temperature, top_p, generator)  # (B,)
            out.append(nxt)
            done |= torch.isin(nxt, stops)
            if bool(done.all()) or step == budget - 1:
                break
            logits = model(nxt[:, None], kv_cache=cache)[:, -1]
    finally:
        model.train(was_training)
    rows = torch.stack(out, dim=1).tolist() if out else [[] for _ in range(B)]
    stop_set = set(eos_token_ids)
    result = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
        result.append(row[:cut])
    return result


# ---------------------------------------------------------------------------------------------------
# Loading a model for generation


@dataclass
class GenerationBundle:
    """A loaded model with its tokenizer and stop tokens."""

    model: Transformer
    tokenizer: Any
    stop_ids: list[int]
    model_dir: Path
    _tmp: Any = field(default=None, repr=False)  # keeps a downloaded artifact's temp dir alive


def resolve_model_dir(uri: str, workdir: Path) -> Path:
    """A plain local HF directory (no `_manifest.json`) as is; otherwise an artifact (prefix/manifest
    file) fetched into `workdir` with every file's sha256 checked. The HF directory is the artifact's
    folder holding config.json and the safetensors weights."""
    if is_plain_hf_dir(uri):
        return Path(uri)
    from kubellm.core.manifest import fetch, load_manifest_ref

    try:
        manifest = load_manifest_ref(uri)
    except KubellmError as e:
        if not uri.startswith("s3://") and (Path(uri) / "config.json").is_file():
            raise ConfigError(f"--model {uri}: has a _manifest.json, so it is an artifact to verify, but "
                              f"the manifest cannot be read ({e})") from None
        raise ConfigError(f"--model {uri}: neither a Hugging Face model directory (no config.json) nor an "
                          f"artifact with a manifest ({e})") from None
    files = {f.path for f in manifest.files}
    roots = []
    for fp in files:
        parent, _, name = fp.rpartition("/")
        if name == "config.json" and ({_join(parent, WEIGHTS_NAME), _join(parent, INDEX_NAME)} & files):
            roots.append(parent)
    if not roots:
        raise ConfigError(f"--model {uri}: the artifact ({manifest.kind}) holds no Hugging Face model "
                          f"(config.json beside {WEIGHTS_NAME})")
    root = min(roots, key=len)  # the top-most model directory in the artifact
    wanted = sorted(fp for fp in files if not root or fp.startswith(root + "/"))
    fetch(manifest, workdir, paths=wanted)
    return workdir / root if root else workdir


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def load_for_generation(uri: str, dtype: torch.dtype = torch.float32) -> GenerationBundle:
    from transformers import AutoTokenizer

    from kubellm.model.hf import load_hf

    tmp = None
    p = Path(uri)
    if not is_plain_hf_dir(uri):
        tmp = tempfile.TemporaryDirectory(prefix="kubellm-generate-")
    model_dir = resolve_model_dir(uri, Path(tmp.name) if tmp else p)
    model, _ = load_hf(model_dir, dtype=dtype)
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{model_dir}: no loadable tokenizer beside the model ({e}); export with "
                          "tokenizer_dir=") from None
    stops: list[int] = []
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen_cfg = read_json(gen_path)
        eos = gen_cfg.get("eos_token_id") if isinstance(gen_cfg, dict) else None
        stops += eos if isinstance(eos, list) else [eos] if eos is not None else []
    if tok.eos_token_id is not None:
        stops.append(tok.eos_token_id)
    if (end := end_of_turn_id(tok)) is not None:  # a directory without generation_config.json stops at a turn's end too
        stops.append(end)
    return GenerationBundle(model, tok, list(dict.fromkeys(stops)), model_dir, tmp)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template with the assistant's turn opened (add_generation_prompt=True)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the tokenizer has no chat_template; use --prompt for plain completion")
    from kubellm.sft.data import encode_chat as encode_conversation

    # as SFT and DPO encode their conversations: the template's bos and role markers are control
    # tokens, a message's text is text (a `<|end|>` typed in a message cannot end its turn)
    return encode_conversation(tokenizer, messages, add_generation_prompt=True, where="--chat")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Plain completion: documents were trained as [bos] + text, so start with bos. The prompt is text
    throughout, as the tokenizer stage encoded documents: a `<|eos|>` typed in it is not the eos id."""
    ids = list(tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def chat(bundle: GenerationBundle, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """Reply to `messages` (`max_new_tokens`, `temperature`, `top_p`, `generator` as `generate`)."""
    ids = encode_chat(bundle.tokenizer, messages)
    new = generate(bundle.model, ids, eos_token_ids=bundle.stop_ids, **kwargs)[0]
    return bundle.tokenizer.decode(new, skip_special_tokens=True)


def complete(bundle: GenerationBundle, prompt: str, **kwargs: Any) -> str:
    ids = encode_prompt(bundle.tokenizer, prompt)
    new = generate(bundle.model, ids, eos_token_ids=bundle.stop_ids, **kwargs)[0]
    return bundle.tokenizer.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------------
# CLI


def configure(parser: argparse.ArgumentParser, command: str = "generate") -> None:
    parser.add_argument("--model", required=True,
                        help="HF model directory, or an artifact prefix/manifest (local or s3://)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--chat", help="a user message; the tokenizer's chat template is applied")
    what.add_argument("--prompt", help="plain text to continue (no chat template)")
    parser.add_argument("--system", help="optional system message for --chat")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")


def main(args: argparse.Namespace) -> int:
    # the checks `generate` makes, before the model is loaded, naming the flags
    check_max_new_tokens(args.max_new_tokens, name="--max-new-tokens")
    check_sampling(args.temperature, args.top_p, names=("--temperature", "--top-p"))
    if args.chat is not None and not args.chat.strip():
        raise ConfigError("--chat is empty: expected a user message (SFT never trains on an empty turn; "
                          "use --prompt '' to generate from the start of a document)")
    bundle = load_for_generation(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, generator=gen)
    if args.chat is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.chat})
        text = chat(bundle, messages, **opts)
    else:
        text = complete(bundle, args.prompt, **opts)
    print(text)
    return 0
