"""Retrieval on a live MichiAI call: the passages a caller's question needs, injected as it ends.

A text LLM does RAG by rebuilding its prompt before each completion. A duplex call never stops
to be re-prompted: it has already read the context, and it keeps listening. So the passages go
into the shared ``LLMContext`` as one new message, and ``MichiLLMService`` (which diffs every
``LLMContextFrame`` against what the call has read) injects just that message into the call::

    pipeline = Pipeline([
        transport.input(),
        context.user(),
        RetrievalInjector(BM25(DOCUMENTS), context.user().context),
        MichiLLMService(system_instruction=SYSTEM),
        transport.output(),
        context.assistant(),
    ])

The injector sits between the user aggregator and the service because the service pushes the
caller's transcripts UPSTREAM: the injector sees each final ``TranscriptionFrame`` before the
aggregator does, adds the reference and sends the context DOWNSTREAM to the service at once.

    .venv/bin/python -m examples.rag_injection "what time do you open on sunday"
    .venv/bin/python -m examples.rag_injection --call   # and a 2 s call with the injector in place

With the embedded engine's random weights the call's transcripts are noise, so the ``--call``
run shows the plumbing (and usually retrieves nothing); a trained model on a GPU worker hears
the question, and the retrieval step printed first is what then reaches it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import sys
from collections import Counter
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from loguru import logger  # noqa: E402
from pipecat.frames.frames import (  # noqa: E402
    Frame,
    LLMContextFrame,
    StartFrame,
    TranscriptionFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.processors.aggregators.llm_context import LLMContext, LLMContextMessage  # noqa: E402
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402

from examples.smoke import CHUNK_SAMPLES, run_smoke_call  # noqa: E402
from pipecat_michi.service import MichiLLMService  # noqa: E402

SYSTEM = "You are Michi, the phone host of Trattoria Sole. Answer from the reference you are given."

DOCUMENTS: dict[str, str] = {
    "hours": "Opening hours: we open Tuesday to Saturday from 12:00 to 22:00 and on Sunday from "
    "12:00 to 16:00. We are closed on Mondays and on public holidays.",
    "menu": "Menu: fresh pasta made every morning, wood-fired pizza, risotto of the day and "
    "tiramisu. Vegetarian dishes are marked; gluten-free pasta costs 2 euros extra.",
    "booking": "Booking policy: tables for up to 8 people can be booked by phone. Groups of more "
    "than 8 pay a 10 euro deposit per person. We hold a booked table for 15 minutes.",
    "address": "Address: Via Roma 12, near the central station. Parking is free after 19:00 in "
    "the garage behind the restaurant, and the 5 and 12 buses stop at the door.",
    "allergies": "Allergies: tell us about nut, dairy or gluten allergies when you book; the "
    "kitchen cooks allergen-free orders separately.",
}

_WORD = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset("a an and are at can do does for how i is it me of on or the to we what when you your".split())


def tokenize(text: str) -> list[str]:
    """Lowercase words, stop words dropped, a crude stem ("opening", "opens" -> "open")."""
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS]
    return [re.sub(r"(ing|s)$", "", w) if len(w) > 4 else w for w in words]


class BM25:
    """Okapi BM25 over a few in-memory documents (id -> text)."""

    def __init__(self, documents: dict[str, str], k1: float = 1.5, b: float = 0.75) -> None:
        self.documents = documents
        self._k1, self._b = k1, b
        self._terms = {doc_id: Counter(tokenize(text)) for doc_id, text in documents.items()}
        self._lengths = {doc_id: sum(terms.values()) for doc_id, terms in self._terms.items()}
        self._mean_length = sum(self._lengths.values()) / len(documents)
        doc_freq = Counter(term for terms in self._terms.values() for term in terms)
        n = len(documents)
        self._idf = {term: math.log(1 + (n - df + 0.5) / (df + 0.5)) for term, df in doc_freq.items()}

    def score(self, query: str, doc_id: str) -> float:
        terms = self._terms[doc_id]
        norm = self._k1 * (1 - self._b + self._b * self._lengths[doc_id] / self._mean_length)
        return sum(self._idf[t] * terms[t] * (self._k1 + 1) / (terms[t] + norm) for t in tokenize(query) if t in terms)

    def rank(self, query: str) -> list[tuple[str, float]]:
        """``(doc_id, score)`` of every document, best first."""
        return sorted(((doc_id, self.score(query, doc_id)) for doc_id in self.documents), key=lambda r: -r[1])


class RetrievalInjector(FrameProcessor):
    """Adds the passages a caller's final transcript asks for to the live call's context.

    Place it between the user aggregator and ``MichiLLMService``. Every frame passes on in its
    direction; on a final ``TranscriptionFrame`` (pushed upstream by the service) the top
    ``top_k`` passages scoring at least ``min_score`` and not yet given in this call are
    appended to ``context`` as one ``role`` message, and ``LLMContextFrame(context)`` goes
    downstream so the service injects that message into the call.
    """

    def __init__(
        self,
        index: BM25,
        context: LLMContext,
        *,
        top_k: int = 2,
        min_score: float = 1.0,
        role: str = "developer",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.index, self.context = index, context
        self._top_k, self._min_score, self._role = top_k, min_score, role
        self._given: set[str] = set()  # doc ids this call already has

    def reference_for(self, question: str) -> tuple[list[str], LLMContextMessage | None]:
        """The passages ``question`` retrieves that the call lacks, and the message carrying them."""
        ranked = self.index.rank(question)[: self._top_k]
        doc_ids = [d for d, score in ranked if score >= self._min_score and d not in self._given]
        if not doc_ids:
            return [], None
        passages = " ".join(self.index.documents[d] for d in doc_ids)
        return doc_ids, {"role": self._role, "content": f"Reference for the caller's question: {passages}"}

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            self._given.clear()
        elif isinstance(frame, TranscriptionFrame) and direction == FrameDirection.UPSTREAM:
            await self._handle_transcription(frame)
        await self.push_frame(frame, direction)

    async def _handle_transcription(self, frame: TranscriptionFrame) -> None:
        doc_ids, message = self.reference_for(frame.text)
        if message is None:
            return
        logger.debug(f"{self}: injecting {doc_ids} for {frame.text!r}")
        self._given.update(doc_ids)
        self.context.add_message(message)
        await self.push_frame(LLMContextFrame(self.context), FrameDirection.DOWNSTREAM)


async def call(seconds: float) -> None:
    """A short call on the embedded engine with the injector in place; prints the context."""
    context = LLMContextAggregatorPair(LLMContext([{"role": "system", "content": SYSTEM}]))
    injector = RetrievalInjector(BM25(DOCUMENTS), context.user().context)
    service = MichiLLMService(system_instruction=SYSTEM)
    rng = np.random.default_rng(0)
    await run_smoke_call(
        Pipeline([context.user(), injector, service, context.assistant()]),
        seconds,
        chunk=lambda _: (rng.standard_normal(CHUNK_SAMPLES) * 3000).astype(np.int16),
    )
    print(f"\ncontext after a {seconds:.0f} s call (random weights: the transcripts are noise):")
    for message in context.user().context.messages:
        print(f"  {message['role']:>9}: {message['content'][:72]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", default="what time do you open on sunday")
    parser.add_argument("--call", action="store_true", help="then run a short call on the embedded engine")
    parser.add_argument("--seconds", type=float, default=2.0, help="caller audio in the --call run")
    args = parser.parse_args()

    injector = RetrievalInjector(BM25(DOCUMENTS), LLMContext())
    print(f"question: {args.question!r}")
    for doc_id, score in injector.index.rank(args.question):
        print(f"  {score:6.2f}  {doc_id}")
    doc_ids, message = injector.reference_for(args.question)
    print(f"retrieved: {doc_ids or 'nothing above the threshold'}")
    if message is not None:
        print(f"injected as {message['role']!r}: {message['content']!r}")
    if args.call:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
        asyncio.run(call(args.seconds))


if __name__ == "__main__":
    main()
