"""One exception tree for the whole fabric.

Every error a user can see is a ``FabricError``. Each subclass says what went wrong and,
through ``retryable``, whether trying the same call again can help. Errors cross process
boundaries (model server -> endpoint -> client) as plain dicts (``to_dict``/``from_dict``), so
the client re-raises the same typed error the server raised.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FabricError(Exception):
    """Root of every error the fabric raises on purpose."""

    retryable: ClassVar[bool] = False
    """True when the same call may succeed if tried again later."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """Wire form: the class name, the message and JSON-able details."""
        return {"kind": type(self).__name__, "message": self.message, "details": self.details}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> FabricError:
        """Rebuild the typed error sent by ``to_dict`` (unknown kinds become ``FabricError``)."""
        cls = _REGISTRY.get(str(data.get("kind")), FabricError)
        return cls(str(data.get("message", "")), **dict(data.get("details") or {}))


class InvalidRequest(FabricError):
    """The request is malformed: a bad argument, type or value. Fix the call; do not retry."""


class UnknownModel(InvalidRequest):
    """The model (or version) is not in the catalog; ``details['available']`` lists the others."""


class AmbiguousModelVersion(UnknownModel):
    """A hash prefix given as ``version`` matches more than one version; ``details['matches']``
    lists them. Pin a longer prefix or the version name."""


class InvalidModelFolder(InvalidRequest):
    """A folder offered to ``fabric models add`` is not a servable model (no ``config.json``,
    no ``*.safetensors``); the message names what is missing. Fix the folder; do not retry."""


class UnsupportedArchitecture(InvalidModelFolder):
    """The model's ``architectures`` are not ones the engine serves; ``details['supported']``
    lists those it does."""


class UnsupportedModelConfig(InvalidModelFolder):
    """The architecture is served but a setting of its config is not (e.g. a RoPE scaling the
    engine does not implement); ``details['supported']`` lists what is. Do not retry."""


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested tokens do not fit the model's context window."""


class InvalidHook(InvalidRequest):
    """A declarative hook (capture, steer, ablate) is out of range or malformed."""


class InvalidManifest(InvalidRequest):
    """A campaign manifest or input file is malformed (``details`` name the line)."""


class InvalidSiteConfig(InvalidRequest):
    """A site definition does not validate against the schema."""


class InvalidPlan(InvalidRequest):
    """A parallel plan does not suit the model: ``ep > 1`` for a dense model, ``ep`` not
    dividing ``tp``, more expert groups than experts. Change the plan; do not retry."""


class Fp8SplitMisaligned(InvalidPlan):
    """With ``fp8: keep``, a tp split cuts through the scale blocks of a block-scaled FP8
    weight (scaled-matmul kernels take whole blocks); the message names the tensor, its shape,
    the block size and the rank's slice. Change tp (or use ``fp8: dequantize``); do not retry."""


class PlanDoesNotFit(InvalidRequest):
    """No pp x tp x ep plan holds the model on the nodes allowed; ``details`` carry the
    closest plan's numbers (bytes per rank, usable bytes, token budget, nodes)."""


class Overloaded(FabricError):
    """The server's bounded queue is full; retry after ``details['retry_after']`` seconds."""

    retryable = True


class DeadlineExceeded(FabricError):
    """The request's own timeout expired before it finished."""

    retryable = True


class Cancelled(FabricError):
    """The request was cancelled by its caller."""


class ModelServerUnavailable(FabricError):
    """The model server died, was cancelled or hit its walltime; a new request relaunches it."""

    retryable = True


class DeploymentError(FabricError):
    """A model server could not be launched or did not become ready (message says why)."""

    retryable = True


class AcceleratorUnavailable(DeploymentError):
    """A model server's plan names a device this node cannot serve on (no visible GPU for
    ``cuda``, or ``xpu``, not supported yet); it refuses to start rather than run on the CPU.
    Fix the plan or the node; a relaunch on the same kind of node fails the same way."""

    retryable = False


class Fp8MatmulUnavailable(AcceleratorUnavailable):
    """A plan asks for ``fp8: keep`` (FP8 weights multiplied with scaled FP8 matmuls) on a
    device that has no FP8 matmul: a CUDA GPU older than compute capability 8.9, an ``xpu``,
    or a torch without ``_scaled_mm``; ``details['reason']`` says which. Use ``fp8:
    dequantize`` (or ``auto``); a relaunch on the same kind of node fails the same way."""

    retryable = False


class RendezvousTimeout(DeploymentError):
    """A model server's rank never heard from rank 0 (it publishes the torch.distributed
    rendezvous port in the job's run folder) within the timeout: rank 0 died or never
    started. A relaunch may succeed."""

    retryable = True


class WeightsChanged(DeploymentError):
    """A registered model's weight files no longer match the hash recorded when it was
    registered (their size/mtime stamp changed, or, on the first server of that version at a
    site, their bytes do not hash to it). The model is refused, not rehashed: register the
    folder again as a new version. Retrying does not help."""

    retryable = False


class CampaignOutputLost(FabricError):
    """A campaign's output files hold less than its ledger says was written (removed,
    truncated or replaced while it ran); ``details['path']`` names the file. Resuming would
    report inputs done whose lines are gone: restore the files, or start a new campaign.
    Retrying does not help."""


class UnsupportedCheckpoint(FabricError):
    """A checkpoint holds something the engine cannot read (a dtype, a scale layout); the
    message names the tensor and what is accepted. Retrying does not help."""


class EndpointError(FabricError):
    """The site endpoint could not be started or reached (message says why)."""

    retryable = True


class AuthError(FabricError):
    """Login is missing, expired or was refused."""


class AccessDenied(FabricError):
    """The site's policy refused the caller; ``details['rule']`` names the rule."""


class QuotaExceeded(AccessDenied):
    """A per-identity quota is used up; ``details['retry_after']`` says when it refills."""

    retryable = True


class FunctionNotAllowed(AccessDenied):
    """The site does not allow this function (user functions need the operator's opt-in)."""


class AdminOnly(AccessDenied):
    """An admin operation (deploy, undeploy) by a caller the site's ``policy.admins`` does not
    name. Retrying does not help: ask the site's operator."""


class DeployLimitExceeded(AccessDenied):
    """A deployment bigger than the site's ``limits`` allow: ``details`` name the limit
    (``rule``), its value (``limit``) and the size asked for (``requested``). Retrying the
    same plan does not help: ask for a smaller one."""


class UserFunctionError(FabricError):
    """A user's function raised at the site; ``details['traceback']`` holds its traceback."""


class NonFiniteOutput(InvalidRequest):
    """The model's outputs for this request became NaN or infinite (an extreme steer hook, or
    sampling settings the model cannot take). Only this request fails; the server goes on
    serving the others. Change the request: the same one fails the same way."""


class ServerInternalError(FabricError):
    """The model server failed on this request or message in a way it did not foresee (a bug:
    ``details['error']`` names the exception). Only this request fails; the server goes on
    serving the others. Retrying the same request most likely fails the same way."""


class RequestTooLarge(InvalidRequest):
    """A request larger than one message to the site may carry (``details['limit']``
    bytes): split it (fewer texts per call, shorter texts)."""


class ResultTooLarge(FabricError):
    """A result is larger than one message may carry; write it to the site's filesystem."""


class TicketInvalid(AccessDenied):
    """A model server refused a request whose ticket is missing, forged or expired."""


class CapabilityDenied(AccessDenied):
    """A user function's handle asked for more than its capability allows: another model,
    more requests or tokens than its limits, or after it expired (``details['rule']``:
    ``capability.model``, ``.requests``, ``.tokens``, ``.expired`` or ``.invalid``). The
    same call fails the same way; a new ``fab.submit`` gets a new capability."""


def _all_subclasses(cls: type[FabricError]) -> list[type[FabricError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_REGISTRY: dict[str, type[FabricError]] = {c.__name__: c for c in _all_subclasses(FabricError)}
