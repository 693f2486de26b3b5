"""distdrgn.attempts: which attempt goes on, and each attempt's config (the CLI run is in
test_abinit.py::test_attempts_run_each_seed_and_the_run_continues_from_the_lowest_loss)."""

import math

from distdrgn.attempts import attempt_config, choose_attempt, final_loss
from distdrgn.config import Config


def test_the_lowest_finite_loss_is_chosen_and_ties_go_to_the_first():
    assert choose_attempt([0.3, 0.1, 0.2]) == 1
    assert choose_attempt([math.nan, 0.5, math.inf]) == 1
    assert choose_attempt([0.2, 0.2]) == 0
    assert choose_attempt([math.nan, math.nan]) == 0


def test_attempt_config_differs_only_in_seed_epochs_and_directory():
    cfg = Config()
    cfg.output.dir, cfg.train.seed, cfg.train.epochs = "run", 7, 30
    cfg.abinit.search_epochs, cfg.abinit.attempts, cfg.abinit.attempt_epochs = 6, 3, 10
    cfg.metrics.port, cfg.debug.trace_samples = 9100, "trace"
    a = attempt_config(cfg, 2)
    assert a.output.dir == "run/attempts/2" and a.train.seed == 9 and a.train.epochs == 10
    assert a.abinit.search_epochs == 10 and a.abinit.attempts == 1 and a.train.analyze is False
    assert a.metrics.port is None and a.debug.trace_samples is None  # the run's own server and trace only
    assert a.model == cfg.model and a.data == cfg.data and a.train.lr == cfg.train.lr
    assert (cfg.output.dir, cfg.train.seed, cfg.abinit.attempts) == ("run", 7, 3)  # the run's config is untouched
    cfg.abinit.attempt_epochs = 0
    assert attempt_config(cfg, 0).train.epochs == 6  # 0: the run's search_epochs


def test_final_loss_is_the_last_epoch_and_nan_reads_as_inf(tmp_path):
    (tmp_path / "loss.csv").write_text("epoch,loss,mse\n1,0.5,0.5\n2,0.25,0.25\n")
    assert final_loss(tmp_path) == 0.25
    (tmp_path / "loss.csv").write_text("epoch,loss,mse\n1,nan,nan\n")
    assert final_loss(tmp_path) == math.inf
