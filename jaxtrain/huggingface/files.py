"""The files of a Hugging Face model directory: safetensors weights (sharded with an index
past a size limit, as `save_pretrained` does) and the tokenizer.

Weights go through the `safetensors` package's numpy API, so neither export nor import
needs PyTorch. Tokenizers:

* a BPE run's `tokenizer.json` (the `tokenizers` file its data was prepared with) is copied
  as is, with a `tokenizer_config.json` naming its end-of-document token;
* a byte run gets an equivalent byte-level BPE with no merges: GPT-2's byte-to-unicode
  pre-tokenizer maps byte b to a character whose id is b, so every text encodes to its
  UTF-8 bytes, as jaxtrain's byte tokenizer does, and decodes back to the same text. Its
  end-of-document token is byte 0 (as in jaxtrain), and `split_special_tokens` keeps that
  token's character (U+0100) in a text encoding as bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxtrain.config.errors import UserError
from jaxtrain.data.tokenizer import BYTE_VOCAB, Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors a checkpoint may carry that are recomputed, not learnt (older Llama checkpoints).
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)
# safetensors dtypes a weight may have: a model's floats (an integer tensor is a quantized
# or a corrupted checkpoint, whose values are not the weights)
FLOAT_DTYPES = ("F32", "F16", "BF16")


def write_weights(directory: Path, tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[str]:
    """Write `tensors` as one model.safetensors, or as numbered shards of at most
    `max_shard_bytes` each (a larger tensor gets a shard of its own) plus the index that
    maps every tensor to its shard. Returns the file names written."""
    from safetensors.numpy import save_file

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    metadata = {"format": "pt"}  # what transformers expects of a safetensors checkpoint
    if len(shards) == 1:
        save_file(shards[0], directory / SINGLE_FILE, metadata=metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, directory / name, metadata=metadata)
    index = {"metadata": {"total_size": int(sum(v.nbytes for v in tensors.values()))},
             "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [*names, INDEX_FILE]


class WeightFiles:
    """The tensors of a directory's safetensors files, read lazily by name. Every tensor
    read is checked at this boundary: a floating dtype (`FLOAT_DTYPES`, from the file's
    header) and only finite values; anything else is one error line naming the file and
    the tensor."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        if (directory / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((directory / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(f"{directory / INDEX_FILE}: not a safetensors index ({err})") from None
            files = sorted(set(weight_map.values()))
        elif (directory / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise UserError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors weights are read)")
        self._directory, self._handles, self._where = directory, {}, {}
        for file in files:
            try:
                handle = safe_open(str(directory / file), framework="np")
            except Exception as err:  # the Rust reader raises its own error types
                raise UserError(f"{directory / file}: cannot read safetensors ({err})") from None
            self._handles[file] = handle
            for name in handle.keys():
                if not name.endswith(_DERIVED_SUFFIXES):
                    self._where[name] = file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._handles[file].get_slice(name).get_shape()) for name, file in self._where.items()}

    def path(self, name: str) -> Path:
        return self._directory / self._where[name]

    def dtype(self, name: str) -> str:
        """The safetensors dtype of tensor `name` (F32, BF16, I8, ...), from the header."""
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def check_dtype(self, name: str) -> None:
        if self.dtype(name) not in FLOAT_DTYPES:
            raise UserError(f"{self.path(name)}: tensor {name} has dtype {self.dtype(name)}; only "
                            f"{', '.join(FLOAT_DTYPES)} weights are read")

    def read(self, name: str) -> np.ndarray:
        """Tensor `name`, checked: a floating dtype and finite values."""
        self.check_dtype(name)
        value = self._handles[self._where[name]].get_tensor(name)
        finite = np.count_nonzero(np.isfinite(value))
        if finite != value.size:
            raise UserError(f"{self.path(name)}: tensor {name} has {value.size - finite} non-finite value(s) "
                            f"(NaN or inf) of {value.size}")
        return value


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (the table the
    `tokenizers` ByteLevel pre-tokenizer uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(BYTE_VOCAB):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(BYTE_VOCAB + extra)
            extra += 1
    return chars


def byte_level_tokenizer():
    """A `tokenizers.Tokenizer` whose ids are the UTF-8 bytes of the text (id = byte)."""
    from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers

    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    tokenizer = HfTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def write_tokenizer(directory: Path, tokenizer: Tokenizer, max_length: int) -> list[str]:
    """tokenizer.json and tokenizer_config.json for `AutoTokenizer.from_pretrained`."""
    hf = byte_level_tokenizer() if tokenizer.kind == "byte" else tokenizer.tokenizer
    hf.save(str(directory / "tokenizer.json"))
    eos = hf.id_to_token(tokenizer.eos_id)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos,
              "model_max_length": max_length, "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False,
              # byte runs: the end-of-document token is byte 0, named by its byte-level character
              # (U+0100); a U+0100 in a text must still encode as its UTF-8 bytes, as in jaxtrain
              "split_special_tokens": tokenizer.kind == "byte"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return ["tokenizer.json", "tokenizer_config.json"]
