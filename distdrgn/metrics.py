"""Prometheus metrics of a training run, served by rank 0 when ``metrics.port`` is set.

Each run uses its own :class:`prometheus_client.CollectorRegistry`, so several runs in one
process (tests) do not clash. Metric names (all ``distdrgn_*``):

- ``distdrgn_images_processed_total`` (counter): images trained on, all ranks;
- ``distdrgn_images_per_second`` (gauge): training throughput, all ranks, last log interval;
- ``distdrgn_loss``, ``distdrgn_mse``, ``distdrgn_kl`` (gauges): last logged values (rank 0's batch);
- ``distdrgn_step_seconds`` (gauge): wall time of the last step;
- ``distdrgn_data_wait_seconds`` (gauge): time the last step waited for its batch;
- ``distdrgn_gpu_memory_bytes`` (gauge): peak allocated GPU memory on rank 0 (0 on CPU);
- ``distdrgn_epoch`` (gauge): current epoch (from 1, as in weights.N.pkl);
- ``distdrgn_nonfinite_steps_total`` (counter): steps skipped for a NaN/inf loss or gradient;
- ``distdrgn_last_checkpoint_timestamp_seconds`` (gauge): Unix time of the last checkpoint.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from distdrgn.errors import DistdrgnError


class TrainingMetrics:
    """Metric objects of one run; :meth:`serve` exposes them over HTTP."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.images = Counter("distdrgn_images_processed", "Images trained on (all ranks)", registry=r)
        self.images_per_second = Gauge("distdrgn_images_per_second", "Training throughput, all ranks", registry=r)
        self.loss = Gauge("distdrgn_loss", "Training loss (last logged step)", registry=r)
        self.mse = Gauge("distdrgn_mse", "Masked MSE (last logged step)", registry=r)
        self.kl = Gauge("distdrgn_kl", "KL divergence per image (last logged step)", registry=r)
        self.step_seconds = Gauge("distdrgn_step_seconds", "Wall time of the last training step", registry=r)
        self.data_wait_seconds = Gauge("distdrgn_data_wait_seconds", "Time the last step waited for data", registry=r)
        self.gpu_memory = Gauge("distdrgn_gpu_memory_bytes", "Peak allocated GPU memory on rank 0", registry=r)
        self.epoch = Gauge("distdrgn_epoch", "Current epoch (from 1, as in weights.N.pkl)", registry=r)
        self.nonfinite_steps = Counter("distdrgn_nonfinite_steps", "Steps skipped for a non-finite loss or gradient",
                                       registry=r)
        self.last_checkpoint = Gauge(
            "distdrgn_last_checkpoint_timestamp_seconds", "Unix time of the last checkpoint", registry=r
        )
        self._server = None

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Start the HTTP exporter (``/metrics``) in a daemon thread; DistdrgnError if the port is taken."""
        try:
            result = start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            raise DistdrgnError(f"metrics.port={port}: cannot serve Prometheus metrics on port {port} "
                                f"({exc.strerror or exc}); choose another port or metrics.port=null") from None
        self._server = result[0] if isinstance(result, tuple) else None

    def checkpoint_written(self) -> None:
        self.last_checkpoint.set(time.time())

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
