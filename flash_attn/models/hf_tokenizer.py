"""Tokenizers written beside a checkpoint, so that ``AutoTokenizer.from_pretrained`` opens the
folder ``save_pretrained`` writes.

transformers is imported only when a ``tokenizers.Tokenizer`` must be wrapped: the library
itself does not need it.
"""

from __future__ import annotations

from pathlib import Path

_TOKEN_OF_ID = {
    "bos_token_id": "bos_token",
    "eos_token_id": "eos_token",
    "pad_token_id": "pad_token",
}


def as_transformers_tokenizer(tokenizer, special_ids: dict):
    """A transformers tokenizer for ``tokenizer``.

    Args:
        tokenizer: a transformers tokenizer (returned as is) or a ``tokenizers.Tokenizer``
            (wrapped in ``PreTrainedTokenizerFast``).
        special_ids: bos_token_id / eos_token_id / pad_token_id -> id or None: the wrapped
            tokenizer's bos/eos/pad tokens are the tokens of these ids.
    """
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    if not (hasattr(tokenizer, "to_str") and hasattr(tokenizer, "id_to_token")):
        raise TypeError(
            "tokenizer must be a transformers tokenizer or a tokenizers.Tokenizer, got "
            f"{type(tokenizer).__name__}"
        )
    from transformers import PreTrainedTokenizerFast

    tokens = {}
    for id_field, token_field in _TOKEN_OF_ID.items():
        token_id = special_ids.get(id_field)
        if isinstance(token_id, int):
            token = tokenizer.id_to_token(token_id)
            if token is None:
                raise ValueError(f"{id_field}={token_id} is not in the tokenizer's vocabulary")
            tokens[token_field] = token
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **tokens)


def save_tokenizer(tokenizer, folder: str | Path, special_ids: dict) -> dict:
    """Write ``tokenizer`` into folder (see :func:`as_transformers_tokenizer`).

    Returns: its bos_token_id, eos_token_id and pad_token_id (None where it has none).
    """
    tokenizer = as_transformers_tokenizer(tokenizer, special_ids)
    tokenizer.save_pretrained(str(folder))
    return {id_field: getattr(tokenizer, id_field, None) for id_field in _TOKEN_OF_ID}
