"""``edged bench``: parse options, run ``edged.bench``, print a table or JSON.

Exit codes: 0 done (failed requests of a load test are counted in the table, not
fatal), 2 bad input or an unreachable, refusing or unknown target."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from edged.cli.common import fail

EXIT_BAD_INPUT = 2
PROTOCOLS = ("http-binary", "http-json", "mqtt")


def bench(
    target: str = typer.Argument(
        ..., metavar="TARGET",
        help="Bundle directory or .tar.gz to time in-process; with --url or --protocol mqtt, a model name."),
    url: Optional[str] = typer.Option(
        None, "--url", metavar="URL", help="Load-test the daemon at this URL (TARGET is a model). Uses $EDGED_TOKEN and "
        "$EDGED_CA_FILE."),
    protocol: Optional[str] = typer.Option(
        None, "--protocol", metavar="NAME", help="Load tests: http-binary (default), http-json or mqtt."),
    threads: Optional[str] = typer.Option(
        None, "--threads", metavar="N,N", help="Bundle: runtime threads to sweep, e.g. 1,2 (0: the runtime's default). "
        "Default 1."),
    batch: Optional[str] = typer.Option(
        None, "--batch", metavar="N,N", help="Bundle: batch sizes to sweep, e.g. 1,4 (needs a dynamic batch dim). "
        "Default: the model's batch, 1 when dynamic."),
    concurrency: Optional[str] = typer.Option(
        None, "--concurrency", metavar="N,N", help="Load tests: concurrent clients per level, e.g. 1,4,16 (the default)."),
    duration: float = typer.Option(3.0, "--duration", metavar="SECONDS", help="Seconds to measure each row."),
    iterations: int = typer.Option(100_000, "--iterations", metavar="N",
                                   help="At most this many timed runs (requests) per row."),
    warmup: int = typer.Option(10, "--warmup", metavar="N", help="Untimed runs before each row (per client)."),
    input: Optional[Path] = typer.Option(
        None, "--input", "-i", help=".npz keyed by input name, or .npy for one input. Default: the "
        "bundle's samples.npz, or random data shaped by the manifest or the model's metadata."),
    version: Optional[str] = typer.Option(None, "--version", "-v", help="Load tests: model version."),
    mqtt_host: str = typer.Option("127.0.0.1", "--mqtt-host", help="MQTT: the broker's host."),
    mqtt_port: int = typer.Option(1883, "--mqtt-port", help="MQTT: the broker's port."),
    device: Optional[str] = typer.Option(
        None, "--device", help="MQTT: the daemon's device_id. Default: the one online device whose "
        "retained status lists the model."),
    topic_prefix: str = typer.Option("edged", "--topic-prefix", help="MQTT: the daemon's mqtt.topic_prefix."),
    qos: int = typer.Option(1, "--qos", metavar="0|1|2", help="MQTT: QoS of the requests."),
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="MQTT: take broker, credentials, TLS, prefix and device from this "
        "edged.toml."),
    timeout: float = typer.Option(30.0, "--timeout", metavar="SECONDS", help="Load tests: seconds to wait per request."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document instead of a table."),
) -> None:
    """Benchmark a bundle in-process, or load-test a running daemon.

    `edged bench BUNDLE` loads the bundle in this process (as the daemon would) and times
    the runtime call: a warm-up, then p50, p90, p99 and throughput for each `--threads`
    and `--batch` value, and the peak RSS. Example: `edged bench bundles/digits-onnx
    --threads 1,2 --batch 1,4`.

    `edged bench --url http://HOST:8080 MODEL` sends requests back to back from 1, 4
    and 16 clients (`--concurrency`) over KServe V2 HTTP (`--protocol http-binary`
    or `http-json`) and prints req/s, p50, p90, p99 and errors per level. With
    `--protocol mqtt` it uses MQTT v5 request/response on the daemon's topics
    (`--mqtt-host`, `--mqtt-port`, `--device`). The client shares this machine's CPU
    with a local daemon. Each row stops at `--duration` or `--iterations`,
    whichever comes first; `--json` is for scripts.
    """
    from rich.console import Console

    from edged.errors import EdgedError

    def bad(message: str) -> None:
        fail(message, EXIT_BAD_INPUT)

    for value, name, low in ((duration, "--duration", 0.0), (timeout, "--timeout", 0.0)):
        if not value > low:
            bad(f"{name} {value:g}: must be more than 0 seconds")
    if iterations < 1 or warmup < 0:
        bad(f"{'--iterations' if iterations < 1 else '--warmup'} {min(iterations, warmup)}: must be "
            f"{'1' if iterations < 1 else '0'} or more")
    if qos not in (0, 1, 2):
        bad(f"--qos {qos}: MQTT QoS is 0, 1 or 2")
    if protocol is not None and protocol not in PROTOCOLS:
        bad(f"--protocol {protocol}: choose one of {', '.join(PROTOCOLS)}")
    remote = url is not None or protocol == "mqtt"
    if remote and (threads is not None or batch is not None):
        bad("--threads and --batch apply to a bundle timed in-process; a daemon's threads are set in its "
            "edged.toml (threads, or per model)")
    if not remote and (concurrency is not None or protocol is not None):
        bad(f"--{'concurrency' if concurrency is not None else 'protocol'} applies to load tests of a daemon: "
            f"give --url http://HOST:8080 (or --protocol mqtt) with a model name")
    err = Console(stderr=True)
    try:
        with _progress_bar(err, enabled=err.is_terminal and not as_json) as on_progress:
            if not remote:
                doc = _bench_bundle(target, threads, batch, duration, iterations, warmup, input, on_progress)
            else:
                from edged.bench.load import LoadOptions
                from edged.bench.stats import parse_counts

                options = LoadOptions(tuple(parse_counts(concurrency or "1,4,16", "--concurrency")), duration,
                                      iterations, warmup, timeout)
                if protocol == "mqtt":
                    broker, device = _mqtt_broker(mqtt_host, mqtt_port, topic_prefix, device, config)
                    from edged.bench.mqtt import bench_mqtt

                    doc = bench_mqtt(broker, device, target, version, url or os.environ.get("EDGED_URL"), input,
                                     qos, options, on_progress)
                else:
                    from edged.bench.load import bench_http

                    doc = bench_http(url or "", target, version, protocol or "http-binary", input, options,
                                     on_progress)
    except EdgedError as exc:
        bad(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    Console().print(_bundle_table(doc) if doc["mode"] == "bundle" else _load_table(doc))
    for row in doc["results"]:
        if row.get("errors"):
            err.print(f"[yellow]warning[/]: {row['errors']} request(s) failed at {row['concurrency']} client(s); "
                      f"first: {row['first_error']}", highlight=False, markup=True)


def _bench_bundle(target: str, threads: Optional[str], batch: Optional[str], duration: float, iterations: int,
                  warmup: int, input: Optional[Path], on_progress: Callable[[str, float], None]) -> dict[str, Any]:
    from edged.bench.local import LocalOptions, bench_bundle
    from edged.bench.stats import BenchError, parse_counts

    path = Path(target)
    if not path.exists():
        raise BenchError(f"{target}: no such bundle directory or .tar.gz (to load-test a daemon's model, "
                         "give --url http://HOST:8080 MODEL)")
    options = LocalOptions(
        threads=tuple(parse_counts(threads or "1", "--threads", minimum=0)),
        batches=tuple(parse_counts(batch, "--batch")) if batch else (),
        duration_s=duration, iterations=iterations, warmup=warmup, input_path=input,
    )
    return bench_bundle(path, options, on_progress)


def _mqtt_broker(host: str, port: int, prefix: str, device: Optional[str], config: Optional[Path]) -> tuple[Any, Optional[str]]:
    from edged.fleet import Broker

    if config is None:
        return Broker(host=host, port=port, prefix=prefix.rstrip("/")), device
    from edged.config import load_config

    cfg = load_config(config)
    mqtt = cfg.mqtt
    broker = Broker(host=mqtt.host, port=mqtt.port, username=mqtt.username, password=mqtt.password, tls=mqtt.tls,
                    ca_file=mqtt.ca_file, cert_file=mqtt.cert_file, key_file=mqtt.key_file,
                    prefix=mqtt.topic_prefix.rstrip("/"))
    return broker, device or cfg.device


@contextlib.contextmanager
def _progress_bar(console: Any, enabled: bool) -> Iterator[Callable[[str, float], None]]:
    """on_progress(label, fraction): one bar per row, drawn on stderr; a no-op when off."""
    if not enabled:
        yield lambda label, fraction: None
        return
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        def update(label: str, fraction: float) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(escape(label), total=1.0)
            bar.update(tasks[label], completed=min(max(fraction, 0.0), 1.0))

        yield update


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _count(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _inputs(doc: dict[str, Any]) -> str:
    return ", ".join(f"{name} {i['dtype']}{i['shape']}" for name, i in doc["inputs"].items())


def _bundle_table(doc: dict[str, Any]) -> Any:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    runtime = doc.get("runtime_version") or doc["runtime"]
    loads = ", ".join(sorted({f"{r['load_s']:.2f}" for r in doc["results"]}))
    title = f"edged bench {doc['model']} {doc['version']} ({runtime}, in-process)"
    table = Table(title=escape(title), min_width=len(title) + 2,
                  caption=escape(f"inputs {_inputs(doc)} ({doc['input_source']}); {doc['warmup']} warm-up runs "
                                 f"per row; load {loads} s; RSS: this process's peak"), box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("threads", "batch", "runs", "p50 ms", "p90 ms", "p99 ms", "runs/s", "items/s", "RSS MiB"):
        table.add_column(column, justify="right", min_width=len(column))
    for row in doc["results"]:
        table.add_row(str(row["threads"] or "default"), str(row["batch"]), str(row["runs"]), _ms(row["p50_ms"]),
                      _ms(row["p90_ms"]), _ms(row["p99_ms"]), _count(row["runs_per_s"]), _count(row["items_per_s"]),
                      f"{row['peak_rss_mb']:.0f}")
    return table


def _load_table(doc: dict[str, Any]) -> Any:
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    where = doc["url"] if doc["mode"] == "http" else f"{doc['device']} via {doc['broker']}"
    protocol = doc["protocol"] if doc["mode"] == "http" else f"mqtt QoS {doc['qos']}"
    version = f" {doc['version']}" if doc.get("version") else ""
    title = f"edged bench {doc['model']}{version} over {protocol} at {where}"
    table = Table(title=escape(title), min_width=len(title) + 2,
                  caption=escape(f"inputs {_inputs(doc)} ({doc['input_source']}); {doc['warmup']} warm-up "
                                 f"requests per client; latency of successful requests"), box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("clients", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(column, justify="right", min_width=len(column))
    for row in doc["results"]:
        errors = f"[red]{row['errors']}[/]" if row["errors"] else "0"
        table.add_row(str(row["concurrency"]), str(row["requests"]), errors, _count(row["req_per_s"]),
                      _ms(row["p50_ms"]), _ms(row["p90_ms"]), _ms(row["p99_ms"]))
    return table
