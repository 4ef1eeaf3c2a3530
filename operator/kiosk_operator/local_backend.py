"""Local mode's WorkerBackend: the pool's workers are processes on this machine (ProcessBackend)."""

from __future__ import annotations

from kiosk_operator.cycle import Jobs, Scaled, Workers
from kiosk_operator.process_backend import ProcessBackend


class LocalBackend:
    """Deployment mode starts and stops processes; Job mode starts batch workers (``--max-jobs``)."""

    def __init__(self, processes: ProcessBackend) -> None:
        self.processes = processes

    def workers(self) -> Workers:
        running = len(self.processes.active())
        return Workers(running, running)

    def busy(self, holding: frozenset[str]) -> frozenset[str]:
        # Draining (SIGTERMed) workers are no longer ours to remove, whether busy or not.
        return holding & frozenset(self.processes.active())

    def scale_to(self, current: int, replicas: int, busy: frozenset[str]) -> Scaled:
        started, stopped = self.processes.scale_to(replicas, busy)
        return Scaled(started, stopped)

    def jobs(self) -> Jobs:
        return Jobs(len(self.processes.active()))

    def enter_job_mode(self) -> None:
        """Nothing to stop: a local pool's mode is fixed when it starts."""

    def create_jobs(self, count: int) -> list[str]:
        return self.processes.start(count)

    def worker_alive(self, name: str) -> bool:
        return self.processes.alive(name)

    def scale_model_server(self, active: bool) -> None:
        """Local mode starts its model server once, up front (local.start_model_server)."""
