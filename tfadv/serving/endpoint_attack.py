"""A score-based black-box attack on a served face-embedding model, through its client only.

`attack_endpoint` runs the Square Attack (Andriushchenko, Croce, Flammarion &
Hein, "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV 2020) against a model behind TF Serving's gRPC API, as an
attacker who can only send images and read embeddings would: no weights, no
gradients, every query an RPC. The threat model is dodging (Sharif, Bhagavatula,
Bauer & Reiter, "Accessorize to a crime", CCS 2016): perturb a face so that the
face system no longer matches it with its own photo, i.e. push its embedding
away from the endpoint's own clean embedding of the same photo until their
cosine similarity falls below the verification threshold. Impersonation (pull
it toward another person's embedding until the similarity reaches the
threshold) is available with `targets`.

The threshold: the exported SavedModel keeps it inside its `verify` signature
(`same_person = similarity >= threshold`); gRPC does not expose the constant,
but `verify` answers reveal it. Without `threshold`, `threshold_from_verify`
brackets it from a few `verify` calls (`low < threshold <= high`, typically
a bracket under 1e-6 wide) and the attack uses `low` (impersonation: `high`),
so every success it reports is one the served `verify` agrees with (up to
float32 rounding).

Bookkeeping, all in images sent to the endpoint ("queries"):

- per example: its clean query (the reference for dodging) plus the search's
  queries, at most `queries + 1`;
- `total_queries`: everything sent, the targets' reference embeddings, the
  `verify` pairs of the threshold search and the final clean re-query included;
- `failed_requests`: 0 in every result: a call that still fails after the
  client's gRPC retry policy (or a malformed answer) stops the attack with an
  error naming it; after the search the clean images are embedded again and compared
  with the first answers (`clean_drift`), so an endpoint that changed model or
  degraded under the attack's load is visible in the result.

    from tfadv.serving import Client
    from tfadv.serving.endpoint_attack import attack_endpoint

    with Client("127.0.0.1:8500", name="facenet") as client:
        result = attack_endpoint(client, crops, eps=4, queries=1000, threshold=0.45)
    print(result.success_rate, result.median_queries)
"""

from __future__ import annotations

import dataclasses
import time
import warnings

import grpc
import numpy as np

from tfadv.attacks.embedding import MODES
from tfadv.attacks.square import EmbeddingSquare
from tfadv.config import check_threshold
from tfadv.export import contract as C

# gRPC codes of an endpoint that is down, busy or too slow (ConnectionError); any other code
# (INVALID_ARGUMENT, NOT_FOUND, ...) is a request it refuses (ValueError).
UNREACHABLE_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                             "ABORTED", "INTERNAL", "UNKNOWN"})
# Largest |difference| between the clean embeddings before and after the attack that still
# counts as the same answer.
CLEAN_TOLERANCE = 1e-5

__all__ = ["CLEAN_TOLERANCE", "EndpointAttackResult", "attack_endpoint", "served_image_size",
           "threshold_from_verify"]


def _rpc_error(err, target) -> Exception:
    """A gRPC error as the exception a caller can act on: ConnectionError when the endpoint
    cannot be reached or keeps failing, ValueError for a request it refuses."""
    code = err.code().name if callable(getattr(err, "code", None)) else "UNKNOWN"
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    text = f"{target}: {code}: {details}"
    if code == "UNAVAILABLE":
        return ConnectionError(f"Cannot reach the model at {text}")
    if code in UNREACHABLE_CODES:
        return ConnectionError(f"The model at {text}")
    return ValueError(text)


def _target(client) -> str:
    return str(getattr(client, "target", "the endpoint"))


def served_image_size(client) -> tuple[int, int]:
    """(H, W) the served model takes, from its metadata (one GetModelMetadata call).

    Raises:
        ConnectionError: the endpoint cannot be reached (UNAVAILABLE after the
            client's retries, or its deadline passed).
        ValueError: the endpoint refuses (e.g. NOT_FOUND: no such model name),
            or the model has no `[N, H, W, 3]` image input.
    """
    try:
        return tuple(int(v) for v in client.image_size)
    except grpc.RpcError as err:
        raise _rpc_error(err, _target(client)) from None


class _Endpoint:
    """The served model as the attack sees it: `f(images float [n, H, W, 3]) -> [n, D]`.

    Every call goes to `client.embed` in chunks of `batch_size`; images whose
    pixels are all whole numbers go as uint8 (the `embed_uint8` signature: the
    same embedding, a quarter of the bytes). A failed call (a gRPC error after
    the client's retry policy, or an answer that is not a finite [n, D] array)
    is counted and ends the attack.
    """

    def __init__(self, client, batch_size):
        self.client = client
        self.batch_size = int(batch_size)
        self.queries = 0  # images embedded (answered)
        self.verify_pairs = 0  # pairs judged by `verify` (answered)
        self.failed = 0
        self.dim = None
        self._cached = None  # (images, embeddings): the next identical call is answered from it

    def answer_next_from(self, images, embeddings):
        """The next call with exactly `images` returns `embeddings` without a query (the
        search's first call re-evaluates the clean images the references came from)."""
        self._cached = (images, embeddings)

    def _call(self, fn, check, what):
        # One attempt: transient errors (UNAVAILABLE) were already retried by the
        # client's gRPC retry policy; what reaches here is a failed request.
        try:
            out = fn()
        except grpc.RpcError as err:
            self.failed += 1
            raise _rpc_error(err, _target(self.client)) from None
        problem = check(out)
        if problem is not None:
            self.failed += 1
            raise ValueError(f"{_target(self.client)} answered {what} with {problem}")
        return out

    def embed(self, x) -> np.ndarray:
        """float32 [n, D] embeddings of float or uint8 images [n, H, W, 3] (queried)."""
        x = np.asarray(x)
        parts = []
        for i in range(0, len(x), self.batch_size):
            part = x[i:i + self.batch_size]
            if part.dtype != np.uint8 and np.all(part == np.round(part)):
                part = part.astype(np.uint8)  # whole pixels in [0, 255]: exact

            def check(out, n=len(part)):
                out = np.asarray(out)
                if out.ndim != 2 or len(out) != n or (self.dim and out.shape[1] != self.dim):
                    return f"shape {out.shape} for {n} images"
                if not np.all(np.isfinite(out)):
                    return "non-finite embeddings"
                return None

            out = np.asarray(self._call(lambda p=part: self.client.embed(p), check,
                                        "an embedding request"), np.float32)
            self.dim = self.dim or out.shape[1]
            self.queries += len(part)
            parts.append(out)
        return np.concatenate(parts)

    def verify(self, a, b):
        """(similarity float [n], same_person bool [n]) from the `verify` signature."""
        def check(out):
            sim, same = (np.asarray(v) for v in out)
            if sim.shape != (len(a),) or same.shape != (len(a),) or not np.all(np.isfinite(sim)):
                return f"similarity {sim.shape} and same_person {same.shape} for {len(a)} pairs"
            return None

        sim, same = self._call(lambda: self.client.verify(a, b), check, "a verify request")
        self.verify_pairs += len(a)
        return np.asarray(sim, np.float64), np.asarray(same, bool)

    def __call__(self, x):
        if self._cached is not None:
            images, embeddings = self._cached
            self._cached = None
            if x.shape == images.shape and np.array_equal(x, images):
                return embeddings
        return self.embed(x)


def threshold_from_verify(client, images, *, rounds: int = 6, points: int = 15,
                          _endpoint=None) -> tuple[float, float]:
    """Brackets the threshold baked into the served `verify` signature from its answers.

    `verify` says `same_person = similarity >= threshold` without revealing the
    threshold. Pairing a face a with a face b the endpoint calls a different
    person, the blends `a + t (b - a)` move the similarity from 1 (t = 0) to
    below the threshold (t = 1); each round sends `points` blends in one call
    and narrows t to the interval where the answer flips. Every answer is a
    bound: `low` is the highest similarity judged different, `high` the lowest
    judged the same, so `low < threshold <= high` however the similarity varies
    along the blend.

    Args:
        client: a `tfadv.serving.Client` (or an object with `metadata` and `verify`).
        images: face crops [N, H, W, 3] in [0, 255] at the served size; the
            first is the anchor, the others (and its negative, black and white
            images) the candidates for a different person.
        rounds, points: refinement rounds and blends per round
            (`rounds + 1` verify calls; t is known to `(points + 1) ** -rounds`).
        _endpoint: internal: the attack's tally of queries and failures.

    Returns:
        `(low, high)` cosine similarities.

    Raises:
        ValueError: the model has no `verify` signature, or every probe is
            judged the same person (or a face is not the same as itself):
            pass the threshold instead.
        ConnectionError: the endpoint cannot be reached.
    """
    endpoint = _endpoint or _Endpoint(client, 32)
    try:
        signatures = client.metadata()["signatures"]
    except grpc.RpcError as err:
        raise _rpc_error(err, _target(client)) from None
    outputs = signatures.get(C.VERIFY_SIGNATURE, {}).get("outputs", {})
    if C.SAME_PERSON not in outputs or C.SIMILARITY not in outputs:
        raise ValueError(f"The model at {_target(client)} has no '{C.VERIFY_SIGNATURE}' "
                         f"signature with '{C.SAME_PERSON}': pass the verification threshold "
                         "(--threshold).")
    x = np.asarray(images, np.float32)
    a = x[0]
    probes = np.concatenate([x[:1], x[1:9], (C.PIXEL_MAX - a)[None],
                             np.full_like(a, C.PIXEL_MIN)[None],
                             np.full_like(a, C.PIXEL_MAX)[None]])
    sims, same = endpoint.verify(np.repeat(a[None], len(probes), 0), probes)
    if not same[0]:
        raise ValueError(f"The served verify judges a face different from itself (similarity "
                         f"{sims[0]:.6f}): its threshold is above 1 - rounding, so every face "
                         "dodges already. Pass --threshold to attack at another one.")
    different = np.flatnonzero(~same)
    if not different.size:
        raise ValueError(f"Every probe pair was judged the same person by {_target(client)} "
                         f"(lowest similarity {sims.min():.4f}): the threshold cannot be "
                         "bracketed from these faces. Pass --threshold.")
    b = probes[different[0]]
    all_sims, all_same = [sims], [same]
    lo, hi = 0.0, 1.0  # same at lo, different at hi
    for _ in range(int(rounds)):
        ts = lo + (hi - lo) * np.arange(1, points + 1) / (points + 1)
        blends = (a[None] + ts[:, None, None, None] * (b - a)[None]).astype(np.float32)
        sims, same = endpoint.verify(np.repeat(a[None], points, 0), blends)
        all_sims.append(sims)
        all_same.append(same)
        flips = np.flatnonzero(~same)
        if flips.size:
            k = flips[0]
            lo, hi = (ts[k - 1] if k else lo), ts[k]
        else:
            lo = ts[-1]
    sims, same = np.concatenate(all_sims), np.concatenate(all_same)
    low, high = float(sims[~same].max()), float(sims[same].min())
    if not low < high:
        raise ValueError(f"The verify answers of {_target(client)} do not follow one threshold "
                         f"(similarity {low:.6f} judged different, {high:.6f} the same). "
                         "Pass --threshold.")
    return low, high


@dataclasses.dataclass
class EndpointAttackResult:
    """What `attack_endpoint` found.

    Attributes:
        n: faces attacked.
        eps: budget in pixels (0-255 scale): Linf max change, or L2 norm.
        norm: "inf" or "2".
        mode: "dodging" or "impersonation".
        queries_budget: the search's queries per face (its clean query on top).
        threshold: cosine threshold the search judged success at.
        threshold_source: "given", or "verify" (bracketed from the served
            `verify` signature; `threshold` is the bracket's low end for
            dodging, its high end for impersonation).
        threshold_bracket: (low, high) with `low < served threshold <= high`
            when the source is "verify", else None.
        success: bool [N]: dodging: cosine(adversarial, clean embedding) <
            threshold; impersonation: cosine(adversarial, target) >= threshold;
            both with the endpoint's embeddings.
        queries: int64 [N]: images sent for each face: its clean query plus the
            search's, <= queries_budget + 1.
        similarity: float64 [N]: cosine of the endpoint's embedding of x_adv
            to the reference.
        failed_requests: calls that failed; always 0 here (a failed call
            stops the attack with an error), recorded as the evidence.
        total_queries: every image (and verify pair) sent, the targets'
            references, threshold search and final clean re-query included.
        clean_drift: max |difference| of the clean embeddings queried after
            the attack from those queried before it.
        seconds: wall time of the whole run.
        x_adv: float32 [N, H, W, 3] pixels in [0, 255]: the inputs found
            (not in `to_dict`).
    """

    n: int
    eps: float
    norm: str
    mode: str
    queries_budget: int
    threshold: float
    threshold_source: str
    threshold_bracket: tuple | None
    success: np.ndarray
    queries: np.ndarray
    similarity: np.ndarray
    failed_requests: int
    total_queries: int
    clean_drift: float
    seconds: float
    x_adv: np.ndarray = dataclasses.field(repr=False)

    @property
    def success_rate(self) -> float:
        """Fraction of faces attacked successfully (0 for none)."""
        return float(np.mean(self.success)) if self.n else 0.0

    @property
    def median_queries(self) -> float | None:
        """Median per-face queries over the successful faces; None when none succeeded."""
        return float(np.median(self.queries[self.success])) if self.success.any() else None

    @property
    def consistent(self) -> bool:
        """The endpoint answered the clean images the same before and after the attack."""
        return self.clean_drift <= CLEAN_TOLERANCE

    def to_dict(self) -> dict:
        """JSON-friendly: numbers, lists and strings; x_adv left out."""
        return {
            "n": self.n, "eps": self.eps, "norm": self.norm, "mode": self.mode,
            "queries_budget": self.queries_budget, "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "threshold_bracket": (list(self.threshold_bracket)
                                  if self.threshold_bracket is not None else None),
            "success_rate": self.success_rate, "success": [bool(v) for v in self.success],
            "queries": [int(v) for v in self.queries], "median_queries": self.median_queries,
            "mean_queries": float(np.mean(self.queries)) if self.n else None,
            "similarity": [float(v) for v in self.similarity],
            "failed_requests": self.failed_requests, "total_queries": self.total_queries,
            "clean_drift": self.clean_drift, "consistent": self.consistent,
            "seconds": self.seconds,
        }


def _check_images(images, size, what="images"):
    x = np.asarray(images)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3 or len(x) == 0:
        raise ValueError(f"Expected {what} [N, H, W, 3] (N >= 1) of RGB pixels. Received "
                         f"shape {x.shape}")
    if x.dtype.kind not in "uif":
        raise ValueError(f"Expected numeric pixels in {what}. Received dtype {x.dtype}")
    if tuple(x.shape[1:3]) != tuple(size):
        raise ValueError(f"The served model takes {size[0]}x{size[1]} images; {what} are "
                         f"{x.shape[1]}x{x.shape[2]}. Crop and resize them with "
                         "`tfadv.data.faces.load_face(path, size=...)` or `load_face_folder`.")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)) or x.min() < C.PIXEL_MIN or x.max() > C.PIXEL_MAX:
        raise ValueError(f"Expected {what} pixels in [0, 255]. Received values in "
                         f"[{x.min():.4g}, {x.max():.4g}]")
    return x


def attack_endpoint(client, images, *, eps: float = 4.0, queries: int = 1000, norm="inf",
                    mode: str = "dodging", threshold: float | None = None, targets=None,
                    seed: int = 0, batch_size: int | None = None,
                    p_init: float = 0.8, progress=False) -> EndpointAttackResult:
    """Square Attack on a served embedding model, through its client only.

    Dodging (Sharif et al., CCS 2016): the reference of each face is the
    endpoint's own clean embedding of it; the search (`EmbeddingSquare`:
    Andriushchenko et al., ECCV 2020) changes one random square window per
    query and stops on a face as soon as the cosine similarity of its
    embedding to the reference falls below the threshold. Impersonation: the
    reference of face i is the endpoint's embedding of `targets[i % M]`, and
    success is a similarity at or above the threshold.

    Args:
        client: a `tfadv.serving.Client` (any object with `embed(images) ->
            [n, D]` and `image_size`; `metadata` and `verify` when no
            threshold is given).
        images: face crops [N, H, W, 3] (or one [H, W, 3]), uint8 or float
            pixels in [0, 255], at the served image size.
        eps: budget in pixels (0-255): the largest change of any pixel (Linf)
            or the L2 norm of the change.
        queries: the search's query budget per face (its clean query comes on top).
        norm: "inf" or "2" (any spelling of `tfadv.ops.norms.canonical_norm`).
        mode: "dodging" or "impersonation".
        threshold: the face system's cosine threshold in [-1, 1]; None: bracketed
            from the served `verify` signature (`threshold_from_verify`).
        targets: impersonation only: face crops [M, H, W, 3] to impersonate.
        seed: seed of the search (the same seed and answers give the same result).
        batch_size: most images per embedding call (default: the client's
            `batch_size`, else 32).
        p_init: initial fraction of the image one window covers (0.8:
            AutoAttack's; the paper uses 0.05 on ImageNet-sized Linf images).
        progress: a progress bar over the query iterations (`Square.run`).

    Returns:
        `EndpointAttackResult`.

    Raises:
        ValueError: bad images or settings, a request the endpoint refuses, or
            no threshold given and none can be bracketed from `verify`.
        ConnectionError: the endpoint cannot be reached, or a call fails after
            the client's gRPC retry policy (the attack stops: its counts would
            be incomplete).
    """
    t0 = time.perf_counter()
    if mode not in MODES:
        raise ValueError(f"Expected mode in {MODES}. Received: mode={mode!r}")
    if (targets is not None) != (mode == "impersonation"):
        raise ValueError("Impersonation needs targets (the faces to impersonate) and dodging "
                         f"takes none. Received: mode={mode!r}, targets "
                         f"{'given' if targets is not None else 'missing'}")
    if threshold is not None:
        threshold = check_threshold(threshold)
    batch_size = int(batch_size or getattr(client, "batch_size", None) or 32)
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    # The search's settings are checked before any query.
    probe = EmbeddingSquare(eps=eps, threshold=0.0 if threshold is None else threshold,
                            mode=mode, norm=norm, queries=queries, p_init=p_init, seed=seed)
    size = served_image_size(client)
    x = _check_images(images, size)
    target_x = None if targets is None else _check_images(targets, size, "targets")
    endpoint = _Endpoint(client, batch_size)

    bracket = None
    if threshold is None:
        bracket = threshold_from_verify(client, x, _endpoint=endpoint)
        # The end that makes every reported success one the served `verify` agrees with.
        threshold = bracket[0] if mode == "dodging" else bracket[1]
    clean = endpoint.embed(x)
    if target_x is None:
        reference = clean
    else:
        target_emb = endpoint.embed(target_x)
        reference = target_emb[np.arange(len(x)) % len(target_x)]
    attack = EmbeddingSquare(eps=probe.eps, threshold=threshold, mode=mode, norm=probe.norm,
                             queries=probe.queries, p_init=probe.p_init, seed=probe.seed,
                             batch_size=max(len(x), 1))
    endpoint.answer_next_from(x, clean)
    found = attack.run(endpoint, x, reference, progress=progress and f"{mode} via endpoint")

    again = endpoint.embed(x)
    drift = float(np.max(np.abs(again - clean)))
    if drift > CLEAN_TOLERANCE:
        warnings.warn(f"{_target(client)} embedded the clean faces differently after the attack "
                      f"(max difference {drift:.3g} > {CLEAN_TOLERANCE:g}): the served model "
                      "changed or degraded during the run.", RuntimeWarning, stacklevel=2)
    sim = found.loss if mode == "dodging" else -found.loss
    return EndpointAttackResult(
        n=len(x), eps=attack.eps, norm=attack.norm, mode=mode, queries_budget=attack.queries,
        threshold=float(threshold), threshold_source="given" if bracket is None else "verify",
        threshold_bracket=bracket, success=np.asarray(found.success, bool),
        queries=found.queries.astype(np.int64) + 1, similarity=np.asarray(sim, np.float64),
        failed_requests=endpoint.failed,
        total_queries=endpoint.queries + endpoint.verify_pairs, clean_drift=drift,
        seconds=time.perf_counter() - t0, x_adv=np.asarray(found.x_adv, np.float32))
