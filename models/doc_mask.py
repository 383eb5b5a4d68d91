"""Packed documents that do not see each other: document ids, per-document positions, the mask.

Pretraining packs documents end to end (bos text [eos] bos text ...). Without a mask a token also
attends into the documents before it; that is harmless for most text but wrong for tasks whose
answer is looked up in the context: retrieval documents reuse their keys (26 passkey letters), so a
query finds same-named needles of earlier documents. With a document mask every document is trained
exactly as it is used at inference: from position 0, seeing only itself (what varlen / cu_seqlens
packing does in torchtitan and verl). The target of a document's last token is still the next
token of the row (the next document's bos when the document has no eos), so what follows an answer
is learnt as before.
"""
import torch


def document_ids(input_ids: torch.Tensor, bos_id: int) -> torch.Tensor:
    """[B, T] token ids -> [B, T] int: the index of each token's document in its row (a new document
    starts at every bos; tokens before the first bos are document 0)."""
    return (input_ids == bos_id).long().cumsum(dim=1)


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids (non-decreasing along each row) -> [B, T] positions restarting at 0 at
    every document start."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] document ids -> [B, T, T] bool: query t sees key s iff s <= t and both are in one document."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
