import sys

import pytest

BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    pytest.param(("trio", {}), id="trio"),
]
if sys.platform != "win32":
    BACKENDS.insert(1, pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"))


@pytest.fixture(params=BACKENDS)
def anyio_backend(request):
    return request.param


@pytest.fixture
def asyncio_only():
    return ("asyncio", {})


@pytest.fixture(scope="session")
def exporter():
    """An in-memory span exporter on the global provider, where the SDK's request spans go."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


@pytest.fixture(autouse=True, scope="session")
def _client_imports_warm():
    """The SDK's client imports jsonschema lazily, on the loop, at its first structured tool result: a real
    block (hundreds of ms on a loaded machine) in whichever test first uses a client. Tests that count blocks
    should see their own code's blocks, not the test client's first import, so it happens once here."""
    import jsonschema.validators  # noqa: F401
