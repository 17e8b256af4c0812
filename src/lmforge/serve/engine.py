"""Continuous batching: one decode loop over the model's one forward, rows joining and leaving between steps.

The engine owns a model with a KV cache of `max_batch` rows. Each running sequence holds one cache row and its
own position: a decode step is one forward over rows [0, b) with per-row slots (`input_pos` (b, 1)), so rows at
different positions share the step. New requests are prefilled into the next free rows (`cache_rows`) between
two steps, the prompts that arrived together in one right-padded forward, and join the next step; a finished or
cancelled sequence leaves, and the last row's cache is moved into its place, so the running rows stay [0, b)
and a step reads no empty rows. Prompts of several sequences (n > 1) run once; their cache row is copied.

Why per-row slots rather than left-padding joiners into shared slots: a joiner's prompt need not fit before
the batch's current position, no row ever has to be shifted, and a row's cost is its own length only.

Shapes: b running rows, P prompt length, V vocabulary.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lmforge.generation.settings import GenerationSettings, sample
from lmforge.models.decoder import Decoder
from lmforge.serve.metrics import Metrics
from lmforge.tokenizer import IncrementalDecoder, Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["Engine", "Event", "QueueFull", "Request", "SamplingParams", "ShuttingDown", "TokenLogprob"]


class QueueFull(Exception):
    """The waiting queue holds `max_queue` requests already."""


class ShuttingDown(Exception):
    """The engine takes no new requests (shutdown has begun)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding parameters, OpenAI's meaning (validated by the HTTP layer)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # the text ends before the first stop string
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; k >= 0: the chosen token's log-probability and the k best


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Event:
    """What one sequence produced in one step: new text (may be empty while held back), the token ids and
    their log-probabilities, and at the end a finish reason ("stop", "length") or an error."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    error_code: str | None = None  # with error: "shutting_down" or "generation_failed"


@dataclass
class Request:
    """A prompt and the n sequences to generate from it; `sink` receives every `Event` (on the engine thread)."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    n: int = 1
    cancelled: bool = False  # set by the caller (client gone): the engine drops the sequences at its next step
    arrived: float = field(default_factory=time.perf_counter)


class _Sequence:
    """One running row: its request, choice index, generated ids, position and text state."""

    def __init__(self, request: Request, index: int, tokenizer: Tokenizer, vocab_size: int):
        self.request, self.index = request, index
        p = request.params
        self.generator = None
        if p.temperature > 0:
            self.generator = torch.Generator()
            self.generator.manual_seed(p.seed + index if p.seed is not None else int(torch.randint(2**62, ())))
        self.settings = GenerationSettings(max_new_tokens=p.max_tokens, do_sample=p.temperature > 0,
                                           temperature=p.temperature or 1.0, top_k=0, top_p=p.top_p)
        self.counts = torch.zeros(vocab_size) if p.presence_penalty or p.frequency_penalty else None
        self.generated: list[int] = []
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.text = ""
        self.emitted = 0  # characters of self.text already sent
        self.position = len(request.prompt)  # the cache slot of the next token fed
        self.last_time = request.arrived


PREFILL_TOKENS = 512  # a batched prefill holds at most this many (padded) prompt tokens


def _prefill_groups(requests: list[Request]) -> list[list[Request]]:
    """Consecutive requests grouped so that each group's rows x longest prompt stays within PREFILL_TOKENS
    (a longer prompt runs alone)."""
    groups: list[list[Request]] = []
    for r in requests:
        if groups and (len(groups[-1]) + 1) * max(len(r.prompt), *(len(g.prompt) for g in groups[-1])) \
                <= PREFILL_TOKENS:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


class Engine:
    """Continuous batching over `model` (a Decoder) on one background thread; see the module docstring.

    max_batch: cache rows (sequences decoded together); max_queue: requests waiting beyond the free rows
    (`submit` raises QueueFull past it); context: cache slots per row (prompt + max_tokens must fit).
    """

    def __init__(self, model: Decoder, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
                 context: int | None = None, metrics: Metrics | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = min(context or 2048, model.config.max_seq_len)
        self.eos_ids = set(model.config.eos_ids) | ({tokenizer.eos_token_id} - {None})
        self.metrics = metrics or Metrics()
        self._pending: collections.deque[Request] = collections.deque()
        self._rows: list[_Sequence] = []
        self._cond = threading.Condition()
        self._closing = False  # no new requests
        self._abort = False  # end every request now
        self._thread: threading.Thread | None = None
        for name, kind, text in [
            ("lmforge_queue_depth", "gauge", "requests waiting for a batch row"),
            ("lmforge_batch_occupancy", "gauge", "sequences in the running batch"),
            ("lmforge_batch_capacity", "gauge", "rows of the running batch (max_batch)"),
            ("lmforge_prompt_tokens_total", "counter", "prompt tokens prefilled"),
            ("lmforge_generated_tokens_total", "counter", "tokens generated"),
            ("lmforge_sequences_total", "counter", "sequences ended, by finish reason"),
            ("lmforge_time_to_first_token_seconds", "histogram", "arrival to first token"),
            ("lmforge_inter_token_seconds", "histogram", "time between two tokens of one sequence"),
            ("lmforge_decode_step_seconds", "histogram", "one batched decode step (forward and sampling)")]:
            self.metrics.describe(name, kind, text)
        self.metrics.set("lmforge_batch_capacity", max_batch)

    # -- the caller's side ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Allocate the cache and start the decode loop thread."""
        self.model.setup_cache(self.max_batch, self.context)
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a request. Raises QueueFull when `max_queue` requests wait already beyond the free rows,
        ShuttingDown after `shutdown`, ValueError when n exceeds max_batch or the prompt plus max_tokens exceed
        the context."""
        if request.n > self.max_batch:
            raise ValueError(f"n ({request.n}) exceeds the server's batch of {self.max_batch} rows")
        if not request.prompt or len(request.prompt) + request.params.max_tokens > self.context:
            raise ValueError(f"the prompt ({len(request.prompt)} tokens) plus max_tokens "
                             f"({request.params.max_tokens}) exceed the context of {self.context} tokens")
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue + self.max_batch - len(self._rows):  # beyond free rows
                raise QueueFull(f"{len(self._pending)} requests are waiting already (max_queue)")
            self._pending.append(request)
            self.metrics.set("lmforge_queue_depth", len(self._pending))
            self._cond.notify()

    def cancel(self, request: Request) -> None:
        """Drop a request (client disconnected): its rows are freed before the next decode step."""
        with self._cond:
            request.cancelled = True
            self._cond.notify()

    @property
    def busy(self) -> bool:
        return bool(self._pending or self._rows)

    def shutdown(self, timeout: float) -> None:
        """Take no new requests, let running and queued ones finish for up to `timeout` seconds, then end the
        rest with an error event and stop the loop."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._abort = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.model.drop_cache()

    # -- the decode loop (engine thread) ----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._abort and not self._pending and not self._rows:
                        self._cond.wait()
                    if self._abort:
                        break
                    admitted = self._take_admissible()
                try:
                    self._drop_cancelled()
                    for group in _prefill_groups(admitted):
                        self._prefill(group)
                    if self._rows:
                        self._step()
                except Exception as err:  # a failed step ends the running requests, not the server
                    logger.exception("decode step failed")
                    self._fail(admitted, f"generation failed: {type(err).__name__}: {err}")
            for seq in self._rows:
                seq.request.sink(Event(seq.index, "", [], error="the server shut down before the request ended",
                                       error_code="shutting_down"))
            for request in self._pending:
                for i in range(request.n):
                    request.sink(Event(i, "", [], error="the server shut down before the request started",
                                           error_code="shutting_down"))
            self._rows, self._pending = [], collections.deque()

    def _fail(self, admitted: list[Request], message: str) -> None:
        """End every running sequence and the just-admitted requests with an error event; free the rows."""
        requests = {id(seq.request): seq.request for seq in self._rows}
        requests.update({id(r): r for r in admitted})
        for request in requests.values():
            request.cancelled = True
            for i in range(request.n):
                request.sink(Event(i, "", [], error=message, error_code="generation_failed"))
        self._rows = []
        self.metrics.set("lmforge_batch_occupancy", 0)

    def _take_admissible(self) -> list[Request]:
        """Pop queued requests, first come first served, while their sequences fit in the free rows."""
        admitted, free = [], self.max_batch - len(self._rows)
        while self._pending and (self._pending[0].cancelled or self._pending[0].n <= free):
            request = self._pending.popleft()
            if not request.cancelled:
                admitted.append(request)
                free -= request.n
        self.metrics.set("lmforge_queue_depth", len(self._pending))
        return admitted

    def _drop_cancelled(self) -> None:
        gone = [i for i, seq in enumerate(self._rows) if seq.request.cancelled]
        for _ in gone:
            self.metrics.inc("lmforge_sequences_total", reason="cancelled")
        self._remove(gone)

    def _remove(self, indices: list[int]) -> None:
        """Free rows `indices`: the last running row's cache moves into each freed row (rows stay [0, b))."""
        for i in sorted(indices, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                self.model.copy_cache_row(last, i)
                self._rows[i] = self._rows[last]
            self._rows.pop()
        self.metrics.set("lmforge_batch_occupancy", len(self._rows))

    def _prefill(self, requests: list[Request]) -> None:
        """Run the prompts of `requests` in one forward, right-padded, request i's in cache row b + i (the
        padding's keys land in slots past the prompt, which a row overwrites before it ever reads them); the
        other sequences of a request (n > 1) get copies of its row. Then choose every first token."""
        b, k = len(self._rows), len(requests)
        lengths = [len(r.prompt) for r in requests]
        P = max(lengths)
        ids = torch.zeros(k, P, dtype=torch.long)  # (k, P)
        for i, r in enumerate(requests):
            ids[i, :lengths[i]] = torch.tensor(r.prompt)
        out = self.model(ids, input_pos=torch.arange(P), cache_rows=slice(b, b + k), last_logits_only=k == 1)
        logits = out.logits[torch.arange(k), torch.tensor(lengths) - 1 if k > 1 else -1].float()  # (k, V)
        vocab = logits.shape[-1]
        firsts = [_Sequence(r, 0, self.tokenizer, vocab) for r in requests]
        self._rows.extend(firsts)
        rows = [(seq, logits[i]) for i, seq in enumerate(firsts)]
        for i, r in enumerate(requests):
            for j in range(1, r.n):
                self.model.copy_cache_row(b + i, len(self._rows))
                self._rows.append(_Sequence(r, j, self.tokenizer, vocab))
                rows.append((self._rows[-1], logits[i]))
        self.metrics.inc("lmforge_prompt_tokens_total", sum(lengths))
        self._remove([b + i for i, (seq, row_logits) in enumerate(rows) if self._advance(seq, row_logits)])

    def _step(self) -> None:
        start = time.perf_counter()
        b = len(self._rows)
        token = torch.tensor([[seq.generated[-1]] for seq in self._rows])  # (b, 1)
        pos = torch.tensor([[seq.position] for seq in self._rows])  # (b, 1)
        logits = self.model(token, input_pos=pos, cache_rows=slice(0, b)).logits[:, -1].float()  # (b, V)
        best = logits.argmax(-1).tolist()  # greedy rows without penalties take this: one op for the batch
        done = []
        for i, seq in enumerate(self._rows):
            seq.position += 1
            if self._advance(seq, logits[i], best[i]):
                done.append(i)
        self._remove(done)
        self.metrics.observe("lmforge_decode_step_seconds", time.perf_counter() - start)

    def _advance(self, seq: _Sequence, logits: torch.Tensor, best: int | None = None) -> bool:
        """Choose seq's next token from its logits (V,) (`best`: their argmax when known), send the event;
        True when the sequence has ended."""
        p = seq.request.params
        if best is not None and seq.counts is None and not seq.settings.do_sample:
            token = best
        else:
            scores = logits
            if seq.counts is not None:  # OpenAI's penalties over the generated tokens
                scores = scores - p.presence_penalty * (seq.counts > 0) - p.frequency_penalty * seq.counts
            token = int(sample(scores[None], seq.settings, seq.generator)[0])
        seq.generated.append(token)
        if seq.counts is not None:
            seq.counts[token] += 1
        now = time.perf_counter()
        first = len(seq.generated) == 1
        self.metrics.observe("lmforge_time_to_first_token_seconds" if first else "lmforge_inter_token_seconds",
                             now - seq.last_time)
        seq.last_time = now
        self.metrics.inc("lmforge_generated_tokens_total")

        finish = None
        if token in self.eos_ids:
            finish = "stop"
        else:
            seq.text += seq.decoder.step(token)
            if len(seq.generated) >= p.max_tokens:
                seq.text += seq.decoder.flush()
                finish = "length"
        if p.stop:
            hits = [seq.text.find(s, max(0, seq.emitted - len(s))) for s in p.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                seq.text, finish = seq.text[:min(hits)], "stop"
        end = len(seq.text)
        if finish is None and p.stop:  # hold back what may be the start of a stop string
            end -= max(len(s) for s in p.stop) - 1
        piece = seq.text[seq.emitted:max(end, seq.emitted)]
        seq.emitted += len(piece)
        logprobs = None if p.logprobs is None else [self._logprob(logits, token, p.logprobs)]
        seq.request.sink(Event(seq.index, piece, [token], logprobs, finish))
        if finish is not None:
            self.metrics.inc("lmforge_sequences_total", reason=finish)
        return finish is not None

    def _logprob(self, logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
        lp = F.log_softmax(logits, -1)
        top = torch.topk(lp, k) if k > 0 else None
        name = self.tokenizer.decode([token])
        best = [] if top is None else [(self.tokenizer.decode([int(t)]), float(v))
                                       for v, t in zip(top.values, top.indices, strict=True)]
        return TokenLogprob(name, float(lp[token]), best)
