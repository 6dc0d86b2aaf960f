"""What a Cloud Hypervisor error answer means, across CH releases.

Theory of operation. Status codes are not a reliable signal: up to v53 CH
answers 500 for nearly everything, v53 moved "not created" to 404 and only
post-v53 HEAD uses 409/400/404 for the add-fs cases (cloud-hypervisor-api.md
§0, §3). The error *chain* is stable: since v47 the body is a JSON array with
the Display of each error from top to root, and v40-v46 send the same words as
one plain string. So classification is a table of substrings, searched in the
chain, most specific first; the status code only breaks ties that the text
cannot (a 503 from micro_http's connection limit carries no chain).

Each entry names the kind of answer and where CH produces the text, so a new
CH release that rewords a message is a one-line change here.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass


class Kind(enum.Enum):
    VM_NOT_CREATED = "vm not created"
    DUPLICATE_ID = "id already in the VM config"
    ID_PENDING_REMOVAL = "id still in the device tree (guest has not ejected it yet)"
    SHARED_MEMORY_OFF = "VM memory is not shared"
    TOO_MANY_QUEUES = "more queues than boot vCPUs"
    BACKEND_QUEUES = "backend offers fewer queues than asked for"
    INVALID_CONFIG = "CH rejected the device config"
    BACKEND_UNREACHABLE = "CH could not connect to the backend socket"
    UNKNOWN_DEVICE = "no such device"
    BUSY = "CH connection limit reached"
    UNEXPECTED = "unexpected answer"


@dataclass(frozen=True)
class _Rule:
    needle: str
    kind: Kind
    source: str


# Most specific first: "Invalid identifier as it is not unique" must win over
# "is not unique", and the backend-queue check over generic device creation.
_RULES: tuple[_Rule, ...] = (
    _Rule("VM is not created", Kind.VM_NOT_CREATED, "api/mod.rs VmNotCreated; 404 from v53"),
    _Rule("VM config is missing", Kind.VM_NOT_CREATED, "api/mod.rs VmMissingConfig"),
    _Rule(
        "Invalid identifier as it is not unique",
        Kind.ID_PENDING_REMOVAL,
        "device_manager.rs add_fs device-tree check; 500 in all versions (§5)",
    ),
    _Rule("is not unique", Kind.DUPLICATE_ID, "config.rs IdentifierNotUnique; 409 on HEAD"),
    _Rule(
        "requires using shared memory or huge pages",
        Kind.SHARED_MEMORY_OFF,
        "config.rs VhostUserRequiresSharedMemory",
    ),
    _Rule("must not exceed boot vCPUs", Kind.TOO_MANY_QUEUES, "config.rs TooManyQueues"),
    _Rule(
        "vCPUs is insufficient for number of queues",
        Kind.TOO_MANY_QUEUES,
        "config.rs TooManyQueues, as older releases word it (the double's v47 profile)",
    ),
    _Rule("Queue number", Kind.BACKEND_QUEUES, "vhost_user/fs.rs queue count vs GET_QUEUE_NUM"),
    _Rule("Cannot create virtio-fs device", Kind.BACKEND_UNREACHABLE, "device_manager.rs"),
    _Rule("Failed to validate config", Kind.INVALID_CONFIG, "vmm/src/config.rs validate()"),
    _Rule("Failed to deserialize JSON", Kind.INVALID_CONFIG, "http_endpoint.rs serde error"),
    _Rule("Failed to find device corresponding", Kind.UNKNOWN_DEVICE, "DeviceManager"),
    _Rule("to remove", Kind.UNKNOWN_DEVICE, "lib.rs NoDeviceToRemove (not booted)"),
    _Rule("Too many open connections", Kind.BUSY, "micro_http MAX_CONNECTIONS = 10 (§9)"),
)


@dataclass(frozen=True)
class Answer:
    """A classified CH error answer: what it means and what CH said."""

    status: int
    kind: Kind
    chain: tuple[str, ...]

    @property
    def reason(self) -> str:
        """The root cause as CH worded it, for log lines and status."""
        return self.chain[-1] if self.chain else f"HTTP {self.status} with no error text"


def error_chain(body: bytes) -> tuple[str, ...]:
    """The error chain from a body: a JSON array (v47+), a string (v40-v46) or raw text."""
    text = body.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        return (text.strip(),) if text.strip() else ()
    if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
        return tuple(parsed)
    if isinstance(parsed, str):
        return (parsed,)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return (parsed["error"],)
    return (text.strip(),)


def classify(status: int, body: bytes) -> Answer:
    """Classify a non-2xx answer by its error chain, falling back to the status."""
    chain = error_chain(body)
    joined = "\n".join(chain)
    for rule in _RULES:
        if rule.needle in joined:
            return Answer(status, rule.kind, chain)
    return Answer(status, Kind.UNEXPECTED, chain)


_RETRYABLE_KINDS = frozenset(
    {Kind.VM_NOT_CREATED, Kind.ID_PENDING_REMOVAL, Kind.BACKEND_UNREACHABLE, Kind.BUSY}
)


def is_retryable(answer: Answer) -> bool:
    """Whether a later attempt can succeed without anyone changing anything.

    An unrecognised 5xx is taken as a passing fault (CH <= v53 uses 500 for
    everything, so we cannot be more precise); an unrecognised 4xx is not.
    """
    if answer.kind in _RETRYABLE_KINDS:
        return True
    return answer.kind is Kind.UNEXPECTED and answer.status >= 500


FIXES: dict[Kind, str] = {
    Kind.SHARED_MEMORY_OFF: "start the VM with shared memory (--memory shared=on) or hugepages",
    Kind.TOO_MANY_QUEUES: "lower num_queues to at most the VM's boot vCPUs",
    Kind.BACKEND_QUEUES: "lower num_queues to what the virtiofsd backend supports",
    Kind.INVALID_CONFIG: "fix the share's settings in the config (CH's words are in reason=)",
    Kind.UNEXPECTED: "check the CH version and its log",
}
"""For answers that no retry can fix: what a human must change."""
