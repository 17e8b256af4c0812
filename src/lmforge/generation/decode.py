"""The decode loop over the model's one forward, gpt-fast style: `model(ids, input_pos=...)` fills the key/value
buffers its attention modules own, first for the prompts (prefill), then one token per step.

Encoder-decoder models (T5) run the same loops (`Seq2SeqDecoding`): the encoder runs once per prompt and every
cross-attention keeps the prompt's keys/values; the decoder's "prompt" is its start token (or the caller's
decoder_input_ids), and the result is the decoder's ids, start token first, as transformers returns them.

Greedy and sampled decoding (`token_loop`) and transformers' vectorised beam search (`beam_search`). Batches of
prompts of different lengths are left-padded; each row gets position ids `cumsum(mask) - 1`, so its result equals
running it alone. Several sequences or beams of one prompt share one prefill. On CUDA (and on the CPU with
compile=True) the one-token step is the model's forward compiled whole over static cache buffers and a mask over
the whole cache: with CUDA graphs (`torch.compile(mode="reduce-overhead")`) on CUDA, as inductor's C++ kernels on
the CPU.

Shapes: B rows being decoded, P prompt length, L cache length, V vocabulary.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.generation.settings import GenerationSettings, penalise, process_logits, resolve_settings, sample
from lmforge.models.blocks import check_input_ids
from lmforge.models.decoder import Decoder
from lmforge.models.seq2seq import EncoderDecoder
from lmforge.tokenizer import Tokenizer

__all__ = ["Decoding", "Seq2SeqDecoding", "generate_ids", "prepare", "start"]

SEQ2SEQ_OPTIONS = ("decoder_input_ids", "decoder_start_token_id")  # generation options of encoder-decoders only

STATIC_CACHE_STEP = 256  # compiled steps round the cache length up to this, so later calls reuse the graphs

_compiled_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STEP_LOCK = threading.Lock()  # compiled steps run one at a time (see Decoding.step)


def compiled_step(model: Decoder) -> Callable[..., Any]:
    """The model's forward compiled once, the whole graph: with CUDA graphs on CUDA (mode="reduce-overhead"),
    as inductor's C++ kernels on the CPU (the elementwise work of a step fused, no per-op Python)."""
    if model not in _compiled_steps:
        # dynamic=False: a new batch size or cache length gets a graph of its own; with dynamo's automatic
        # dynamic shapes the second shape would turn the step into one symbolic graph, 1.6x slower on the CPU.
        # CPU: no size and alignment asserts in the graph's wrapper (~400 checks per step, 0.6-1 ms of a 1-row
        # step's ~5 ms outside the products; the inputs are checked by dynamo's guards, and lmforge's operators
        # return the contiguous tensors their fake implementations describe).
        cuda = model.norm.weight.device.type == "cuda"
        settings = dict(mode="reduce-overhead") if cuda else dict(options={"size_asserts": False,
                                                                              "alignment_asserts": False})
        _compiled_steps[model] = torch.compile(model.forward, fullgraph=True, dynamic=False, **settings)
    return _compiled_steps[model]


class Decoding:
    """The model side of one generation call: the cache, masks and positions of B rows, prefill and steps.

    Without `compiled` the cache holds exactly P + max_new slots and each step reads the filled ones. With it
    (default on CUDA) the cache length is rounded up to `STATIC_CACHE_STEP` and every step reads the whole
    cache under a mask, so all steps have one shape.
    """

    def __init__(self, model: Decoder, input_ids: Tensor, attention_mask: Tensor, max_new: int,
                 use_compile: bool | None):
        B, P = input_ids.shape
        self.model = model
        self.device = input_ids.device
        self.compiled = use_compile if use_compile is not None else self.device.type == "cuda"
        length = P + max_new
        if self.compiled:
            length = min(-(-length // STATIC_CACHE_STEP) * STATIC_CACHE_STEP, model.config.max_seq_len)
        model.setup_cache(B, length)
        self.mask = torch.ones(B, length, dtype=torch.bool, device=self.device)  # (B, L)
        self.mask[:, :P] = attention_mask.bool()
        self.padded = not bool(self.mask[:, :P].all())
        self.position = attention_mask.long().cumsum(-1) - 1  # (B, P), as transformers counts them
        self.position.masked_fill_(attention_mask == 0, 1)
        self.length = 0  # slots filled
        self.guarded = False  # a compiled step of this call has run under all of dynamo's guards

    def prefill(self, input_ids: Tensor, copies: int = 1) -> Tensor:
        """Run the prompts, return the last logits (B, V) in float32 (the caller's own: the decode loops change
        them in place). `copies` > 1: rows come in groups of that
        many equal prompts (sequences or beams of one prompt); each group runs once and its cache row is
        copied to the group's rows."""
        B, P = input_ids.shape
        first = slice(None, None, copies)
        mask = self.mask[first, :P] if self.padded else None
        out = self.model(input_ids[first], attention_mask=mask, position_ids=self.position[first],
                         input_pos=torch.arange(P, device=self.device), last_logits_only=True)
        logits = out.logits[:, -1].float()
        if copies > 1:
            self.model.reorder_cache(torch.arange(B // copies, device=self.device).repeat_interleave(copies))
            logits = logits.repeat_interleave(copies, 0)
        self.position = self.position[:, -1]  # (B,): the last position of each row
        self.length = P
        return logits

    def step(self, token: Tensor) -> Tensor:
        """Logits (B, V) in float32 after feeding token (B,) at the next slot (the caller's own, as prefill's)."""
        self.position = self.position + 1
        input_pos = torch.tensor([self.length], device=self.device)
        self.length += 1
        if self.compiled:
            cuda = self.device.type == "cuda"
            # CPU: the first step of a call checks all of dynamo's guards and picks (or compiles) the graph; the
            # later ones only check the guards that tell the cached graphs apart (~1 ms of a ~5 ms step outside
            # the products): within one call the model, its modules and cache, and every input's shape, dtype
            # and device are those of the first step, only the inputs' values change. The stance is global to
            # the process: one thread's compiled step at a time, so no other thread's first step runs under it.
            with _STEP_LOCK, torch.compiler.set_stance("default", skip_guard_eval_unsafe=self.guarded and not cuda):
                logits = compiled_step(self.model)(token[:, None], attention_mask=self.mask,
                                                   position_ids=self.position[:, None], input_pos=input_pos).logits
            self.guarded = True
            return logits[:, -1].to(torch.float32, copy=cuda)  # CUDA graphs reuse theirs
        mask = self.mask[:, :self.length] if self.padded else None
        out = self.model(token[:, None], attention_mask=mask, position_ids=self.position[:, None],
                         input_pos=input_pos)
        return out.logits[:, -1].float()

    def reorder(self, index: Tensor) -> None:
        """Keep cache rows `index` (B,) (beam search); a prompt's beams share their masks and positions."""
        self.model.reorder_cache(index)


class Seq2SeqDecoding:
    """The model side of one encoder-decoder generation call, with `Decoding`'s interface: the encoder runs
    once on the Bp prompts, each cross-attention keeps their keys/values (one row per prompt), and the
    B = Bp * group decoder rows (a prompt's sequences or beams, consecutive) decode over self-attention caches.
    `mask` (B, L) marks every decoder token real (decoder inputs are never padded)."""

    def __init__(self, model: EncoderDecoder, input_ids: Tensor, attention_mask: Tensor, rows: int,
                 length: int):
        self.model = model
        self.device = input_ids.device
        self.input_ids = input_ids
        self.memory_mask = None if bool(attention_mask.all()) else attention_mask  # (Bp, S)
        model.setup_cache(rows, length)
        self.mask = torch.ones(rows, length, dtype=torch.bool, device=self.device)  # (B, L)
        self.length = 0

    def prefill(self, decoder_input_ids: Tensor, copies: int = 1) -> Tensor:
        """Encode the prompts, remember the cross-attention keys/values, run the decoder prompts (B, P); the
        last logits (B, V) in float32, the caller's own. (`copies` is implied: the rows of a prompt share its
        encoder row.)"""
        memory = self.model.encode(self.input_ids, self.memory_mask)
        self.model.remember(memory)
        P = decoder_input_ids.shape[1]
        out = self.model.decode(decoder_input_ids, memory_mask=self.memory_mask,
                                input_pos=torch.arange(P, device=self.device), last_logits_only=True)
        self.length = P
        return out.logits[:, -1].float()

    def step(self, token: Tensor) -> Tensor:
        """Logits (B, V) in float32 after feeding token (B,) at the next decoder position (the caller's own)."""
        input_pos = torch.tensor([self.length], device=self.device)
        self.length += 1
        out = self.model.decode(token[:, None], memory_mask=self.memory_mask, input_pos=input_pos)
        return out.logits[:, -1].float()

    def reorder(self, index: Tensor) -> None:
        """Keep decoder cache rows `index` (B,) (beam search, within each prompt's group)."""
        self.model.reorder_cache(index)


@contextmanager
def inference(model: nn.Module):
    """No autograd and eval mode (no dropout) for the duration; the model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


# --- decoding loops -----------------------------------------------------------------------------------------

def _stop_string_hits(tokenizer: Tokenizer, seqs: Tensor, start: int, stops: tuple[str, ...]) -> Tensor:
    """(N,) bool: the text of seqs[:, start:] contains a stop string."""
    texts = [tokenizer.decode(row) for row in seqs[:, start:].tolist()]
    return torch.tensor([any(s in t for s in stops) for t in texts], device=seqs.device)


def token_loop(run: Decoding, input_ids: Tensor, s: GenerationSettings, generator: torch.Generator | None,
                tokenizer: Tokenizer | None) -> Iterator[Tensor]:
    """Greedy or sampled decoding; yields the next token of every row (B,), pad for finished rows."""
    B, P = input_ids.shape
    seqs = torch.full((B, P + s.max_new_tokens), s.pad_id, dtype=torch.long, device=input_ids.device)
    seqs[:, :P] = input_ids
    eos = torch.tensor(s.eos_ids, dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    penalised = s.repetition_penalty != 1.0 or s.no_repeat_ngram_size > 0 or s.min_new_tokens > 0
    logits = run.prefill(input_ids, s.num_return_sequences)
    for n in range(s.max_new_tokens):
        cur = P + n
        scores = penalise(logits, seqs[:, :cur], run.mask[:, :cur], n, s, owned=True) if penalised else logits
        token = sample(scores, s, generator)
        token = torch.where(unfinished, token, s.pad_id)
        seqs[:, cur] = token
        if len(eos):
            unfinished &= ~torch.isin(token, eos)
        if s.stop_strings:
            unfinished &= ~_stop_string_hits(tokenizer, seqs[:, :cur + 1], P, s.stop_strings)
        yield token
        if n + 1 == s.max_new_tokens or not bool(unfinished.any()):
            return
        logits = run.step(token)


def _gather_beams(t: Tensor, index: Tensor) -> Tensor:
    """t (B, K, ...) at beams index (B, K') -> (B, K', ...)."""
    return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)


def beam_search(run: Decoding, input_ids: Tensor, s: GenerationSettings, generator: torch.Generator | None,
                 tokenizer: Tokenizer | None) -> Tensor:
    """transformers' vectorised beam search; input_ids (B * num_beams, P) -> (B * num_return_sequences, T).

    Keeps, per prompt, `num_beams` running hypotheses and the `num_beams` best finished ones (scored by summed
    log-probability / generated_length ** length_penalty); stops per `early_stopping` as transformers does.
    """
    nb, P, device = s.num_beams, input_ids.shape[1], input_ids.device
    B = input_ids.shape[0] // nb
    max_len = P + s.max_new_tokens
    keep = max(2, 1 + len(s.eos_ids)) * nb  # enough candidates that num_beams of them can go on
    top_nb = torch.arange(keep, device=device) < nb
    eos = torch.tensor(s.eos_ids, dtype=torch.long, device=device)
    # transformers fills finished beams with `pad_token_id or eos_token_id[0]`: eos when the pad id is 0.
    fill = s.pad_id if s.pad_id or not s.eos_ids else s.eos_ids[0]
    running = torch.full((B, nb, max_len), fill, dtype=torch.long, device=device)
    running[:, :, :P] = input_ids.view(B, nb, P)
    finished = running.clone()
    running_scores = torch.zeros(B, nb, device=device)
    running_scores[:, 1:] = -1e9  # only the first beam's continuations count at the first step
    finished_scores = torch.full((B, nb), -1e9, device=device)
    finished_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    min_keep = len(s.eos_ids) + 1
    logits = run.prefill(input_ids, nb)
    for cur in range(P, max_len):
        logp = F.log_softmax(logits, dim=-1)  # (B * nb, V)
        flat = running[:, :, :cur].reshape(B * nb, cur)
        logp = process_logits(logp, flat, run.mask[:, :cur], cur - P, s, min_keep)
        V = logp.shape[-1]
        logp = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if s.do_sample:
            index = torch.multinomial(logp.softmax(-1), keep, generator=generator)  # (B, keep)
            top_scores = logp.gather(1, index)
        else:
            top_scores, index = torch.topk(logp, keep)
        beam, token = index // V, index % V  # (B, keep)
        cand = _gather_beams(running, beam)  # (B, keep, max_len)
        cand[:, :, cur] = token
        hits = torch.isin(token, eos) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= max_len:
            hits = torch.ones_like(hits)
        if s.stop_strings:
            hits |= _stop_string_hits(tokenizer, cand[:, :, :cur + 1].reshape(B * keep, -1), P,
                                      s.stop_strings).view(B, keep)

        # The best num_beams candidates that did not finish go on.
        go_scores = top_scores + hits.float() * -1e9
        go = torch.topk(go_scores, nb).indices  # (B, nb)
        running = _gather_beams(cand, go)
        running_scores = go_scores.gather(1, go)
        source_beam = beam.gather(1, go)  # (B, nb)

        # Finished candidates among the top num_beams join the finished set if they beat its members.
        just = hits & top_nb
        fin_scores = top_scores / ((cur + 1 - P) ** s.length_penalty)
        full = is_finished.all(-1, keepdim=True) & (s.early_stopping is True)
        for excluded in (full, ~improvable, ~just):  # added one by one, as transformers does (same rounding)
            fin_scores = fin_scores + excluded.float() * -1e9
        merged = torch.topk(torch.cat([finished_scores, fin_scores], 1), nb).indices  # (B, nb)
        finished = _gather_beams(torch.cat([finished, cand], 1), merged)
        finished_scores = torch.cat([finished_scores, fin_scores], 1).gather(1, merged)
        lengths = torch.full_like(token, cur + 1 - P)
        finished_len = torch.cat([finished_len, lengths], 1).gather(1, merged)
        is_finished = torch.cat([is_finished, just], 1).gather(1, merged)

        # Stop when no running beam can beat the worst finished one (transformers' heuristics), when every
        # beam finished under early_stopping=True, or when every candidate finished (max length).
        steps = (max_len if s.early_stopping == "never" and s.length_penalty > 0 else cur + 1) - P
        best_running = running_scores[:, :1] / (steps ** s.length_penalty)
        worst_finished = torch.where(is_finished, finished_scores.min(1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        all_done = bool(is_finished.all()) and s.early_stopping is True
        if not bool(improvable.any()) or all_done or bool(hits.all()):
            break
        run.reorder((torch.arange(B, device=device)[:, None] * nb + source_beam).view(-1))
        logits = run.step(running[:, :, cur].reshape(-1))

    nrs = s.num_return_sequences
    out_len = P + int(finished_len[:, :nrs].max())
    return finished[:, :nrs, :out_len].reshape(B * nrs, out_len)


def check_decoder(model: Any) -> None:
    """Raise unless `model` generates: a Decoder or an EncoderDecoder (T5), with its language-model head."""
    if not isinstance(model, (Decoder, EncoderDecoder)):
        raise TypeError(f"generation needs an lmforge Decoder (a causal language model) or EncoderDecoder (T5), "
                        f"got {type(model).__name__}")
    if model.config.head != "lm":
        raise ValueError(f"generation needs a language-model head, this model has head={model.config.head!r}")


def _default_mask(input_ids: Tensor, s: GenerationSettings, pad_given: bool) -> Tensor:
    """As transformers infers it: mask pad ids only when the pad id is known and is no eos id."""
    if pad_given and s.pad_id not in s.eos_ids and bool((input_ids == s.pad_id).any()):
        return (input_ids != s.pad_id).long()
    return torch.ones_like(input_ids)


def _generator(seed: int | None, generator: torch.Generator | None,
               device: torch.device) -> torch.Generator | None:
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device=device).manual_seed(seed)


def _decoder_prompt(model: EncoderDecoder, rows: int, options: dict[str, Any], device: torch.device) -> Tensor:
    """An encoder-decoder's decoder prompt (rows, P): decoder_input_ids, else the start token (decoder_start_token_id,
    else the model's)."""
    cfg = model.config
    given = options.get("decoder_input_ids")
    if given is not None:
        if options.get("decoder_start_token_id") is not None:
            raise ValueError("give decoder_input_ids or decoder_start_token_id, not both")
        check_input_ids(given, cfg.vocab_size)
        if given.shape[0] != rows:
            raise ValueError(f"decoder_input_ids has {given.shape[0]} rows, input_ids {rows}")
        return given.to(device=device, dtype=torch.long)
    start = options.get("decoder_start_token_id", cfg.decoder_start_token_id)
    if start is None:
        start = cfg.pad_token_id
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < cfg.vocab_size:
        raise ValueError(f"decoder_start_token_id must be a token id in [0, {cfg.vocab_size}), got {start!r}")
    return torch.full((rows, 1), start, dtype=torch.long, device=device)


def prepare(model: Decoder | EncoderDecoder, input_ids: Tensor, attention_mask: Tensor | None,
            kwargs: dict[str, Any]):
    """Validate the inputs: returns (settings, generator, input_ids, attention_mask, options); `start` expands
    them per sequence or beam. Raises ValueError naming an option that does not fit the model's kind."""
    check_decoder(model)
    check_input_ids(input_ids, model.config.vocab_size)
    seq2seq = isinstance(model, EncoderDecoder)
    options = {k: kwargs.pop(k) for k in ("seed", "generator", "tokenizer", "compile", *SEQ2SEQ_OPTIONS)
               if k in kwargs}
    if not seq2seq:
        given = [k for k in SEQ2SEQ_OPTIONS if options.get(k) is not None]
        if given:
            raise ValueError(f"{given[0]} applies to encoder-decoder models (T5); this {model.config.family} "
                             f"decoder continues input_ids")
    elif options.get("compile"):
        raise ValueError("compile=True (the compiled decode step) is for decoder-only models; an "
                         "encoder-decoder (T5) decodes eagerly")
    device = (model.encoder if seq2seq else model).norm.weight.device
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if seq2seq:
        options["prompt"] = _decoder_prompt(model, input_ids.shape[0], options, device)
    prompt_len = options["prompt"].shape[1] if seq2seq else input_ids.shape[1]
    s = resolve_settings(model.config, prompt_len, **kwargs)
    if attention_mask is None:
        pad_known = kwargs.get("pad_token_id", model.config.pad_token_id) is not None
        attention_mask = _default_mask(input_ids, s, pad_known)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                         f"{tuple(input_ids.shape)}")
    attention_mask = attention_mask.to(device)
    if seq2seq:
        if not bool(attention_mask.any(-1).all()):
            raise ValueError("every prompt needs at least one real token: attention_mask has a row of zeros")
    elif not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: attention_mask must be 1 at every row's last position")
    if s.stop_strings and options.get("tokenizer") is None:
        raise ValueError("stop_strings needs tokenizer= to read the generated text")
    generator = _generator(options.get("seed"), options.get("generator"), device)
    return s, generator, input_ids, attention_mask, options


def start(model: Decoder | EncoderDecoder, input_ids: Tensor, attention_mask: Tensor, s: GenerationSettings,
          options: dict[str, Any]) -> tuple[Decoding | Seq2SeqDecoding, Tensor]:
    """The model side of a call and the prompts the decode loops extend (B * sequences or beams, P): the
    prompts themselves for a decoder, the decoder prompts for an encoder-decoder (whose encoder inputs stay
    one row per prompt)."""
    expand = s.num_beams if s.num_beams > 1 else s.num_return_sequences
    if isinstance(model, EncoderDecoder):
        prompt = options["prompt"].repeat_interleave(expand, dim=0)
        run = Seq2SeqDecoding(model, input_ids, attention_mask, prompt.shape[0],
                              prompt.shape[1] + s.max_new_tokens)
        return run, prompt
    if expand > 1:
        input_ids = input_ids.repeat_interleave(expand, dim=0)
        attention_mask = attention_mask.repeat_interleave(expand, dim=0)
    return Decoding(model, input_ids, attention_mask, s.max_new_tokens, options.get("compile")), input_ids


def generate_ids(model: Decoder | EncoderDecoder, input_ids: Tensor, attention_mask: Tensor | None = None,
                 **kwargs: Any) -> Tensor:
    """Token ids as transformers' `model.generate` returns them: (B * num_return_sequences, T), prompt first
    (an encoder-decoder's decoder prompt: its start token); rows that finished early are padded with the pad
    id (the model's, else the first eos id).

    input_ids: (B, P) prompts, left-padded for a decoder (an encoder-decoder's may be padded on either side);
    attention_mask: (B, P), 1 for real tokens (inferred from the pad id when it is no eos id, else all ones).
    kwargs: the decoding settings of `resolve_settings` (max_length counts the decoder's tokens, start token
    included, for an encoder-decoder, as in transformers), plus seed (int) or generator (torch.Generator) for
    sampling, tokenizer (for stop_strings), compile (decoders; default: on CUDA; the one-token step compiled
    over static cache buffers, with CUDA graphs on CUDA, as C++ kernels on the CPU, where the first call
    spends tens of seconds compiling), and for encoder-decoders decoder_start_token_id or
    decoder_input_ids (B, P') (the decoder's prompt).
    Raises TypeError/ValueError for bad inputs or settings, naming them.
    """
    s, generator, input_ids, attention_mask, options = prepare(model, input_ids, attention_mask,
                                                                dict(kwargs))
    with inference(model):
        run, prompt = start(model, input_ids, attention_mask, s, options)
        if s.num_beams > 1:
            return beam_search(run, prompt, s, generator, options.get("tokenizer"))
        tokens = list(token_loop(run, prompt, s, generator, options.get("tokenizer")))
        return torch.cat([prompt, torch.stack(tokens, 1)], 1)
