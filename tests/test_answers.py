"""Classification of CH error answers across versions (cloud-hypervisor-api.md §3)."""

from __future__ import annotations

import json

import pytest

from watcher.answers import Kind, classify, error_chain, is_retryable

API = "Error from API"
ADD = "The fs could not be added to the VM"


def chain(*items: str) -> bytes:
    return json.dumps(list(items)).encode()


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (404, chain(API, ADD, "VM is not created"), Kind.VM_NOT_CREATED),
        (500, chain(API, ADD, "VM is not created"), Kind.VM_NOT_CREATED),
        (
            409,
            chain(API, ADD, "Failed to validate config", "Identifier cocoon-fs-a is not unique"),
            Kind.DUPLICATE_ID,
        ),
        (
            500,
            chain(API, ADD, "Failed to validate config", "Identifier cocoon-fs-a is not unique"),
            Kind.DUPLICATE_ID,
        ),
        (
            500,
            chain(
                API,
                ADD,
                "Error from device manager",
                "Invalid identifier as it is not unique: cocoon-fs-a",
            ),
            Kind.ID_PENDING_REMOVAL,
        ),
        (
            400,
            chain(
                API,
                ADD,
                "Failed to validate config",
                "Using vhost-user requires using shared memory or huge pages",
            ),
            Kind.SHARED_MEMORY_OFF,
        ),
        (
            500,
            chain(
                API,
                ADD,
                "Failed to validate config",
                "Queue count (2) must not exceed boot vCPUs (1)",
            ),
            Kind.TOO_MANY_QUEUES,
        ),
        (
            500,
            chain(
                API,
                ADD,
                "Failed to validate config",
                "Number of vCPUs is insufficient for number of queues",  # older releases
            ),
            Kind.TOO_MANY_QUEUES,
        ),
        (
            400,
            chain(
                API,
                ADD,
                "Failed to validate config",
                "Queue size must be a power of 2 no greater than 32768: 1000",
            ),
            Kind.INVALID_CONFIG,
        ),
        (
            500,
            chain(
                API,
                ADD,
                "Error from device manager",
                "Cannot create virtio-fs device",
                "Timed out waiting for vhost-user connection",
            ),
            Kind.BACKEND_UNREACHABLE,
        ),
        (
            500,
            chain(
                API,
                ADD,
                "Error from device manager",
                "Cannot create virtio-fs device",
                "Connection to socket failed",
            ),
            Kind.BACKEND_UNREACHABLE,
        ),
        (
            500,
            chain(
                API,
                ADD,
                "Error from device manager",
                "Cannot create virtio-fs device",
                "Queue number  is not correct",
            ),
            Kind.BACKEND_QUEUES,
        ),
        (
            404,
            chain(
                API,
                "The device could not be removed from the VM",
                "Error from device manager",
                "Failed to find device corresponding to the given identifier: foo",
            ),
            Kind.UNKNOWN_DEVICE,
        ),
        (
            500,
            chain(
                API,
                "The device could not be removed from the VM",
                'No device with id "foo" to remove',
            ),
            Kind.UNKNOWN_DEVICE,
        ),
        (503, b'{ "error": "Too many open connections" }', Kind.BUSY),
        (500, chain("something new"), Kind.UNEXPECTED),
    ],
)
def test_classification_by_chain_text(status: int, body: bytes, kind: Kind) -> None:
    assert classify(status, body).kind is kind


def test_pre_v47_plain_text_body_is_classified_too() -> None:
    body = (
        b"Error from API: The fs could not be added to the VM: "
        b"Failed to validate config: Identifier x is not unique"
    )
    assert classify(500, body).kind is Kind.DUPLICATE_ID
    assert classify(500, json.dumps(body.decode()).encode()).kind is Kind.DUPLICATE_ID


def test_micro_http_non_json_error_body_yields_its_text() -> None:
    body = (
        b'{ "error": "Invalid HTTP Method: Unsupported HTTP method.\n'
        b'All previous unanswered requests will be dropped." }'
    )
    assert error_chain(body)[0].startswith('{ "error"')


def test_reason_is_the_root_of_the_chain() -> None:
    answer = classify(
        500,
        chain(
            API,
            ADD,
            "Failed to validate config",
            "Using vhost-user requires using shared memory or huge pages",
        ),
    )
    assert answer.reason == "Using vhost-user requires using shared memory or huge pages"
    assert classify(500, b"").reason == "HTTP 500 with no error text"


@pytest.mark.parametrize(
    ("status", "body", "retry"),
    [
        (404, chain("VM is not created"), True),
        (500, chain("Cannot create virtio-fs device"), True),
        (500, chain("Using vhost-user requires using shared memory or huge pages"), False),
        (500, chain("brand new failure"), True),
        (400, chain("brand new failure"), False),
    ],
)
def test_retryable(status: int, body: bytes, retry: bool) -> None:
    assert is_retryable(classify(status, body)) is retry
