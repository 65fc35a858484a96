"""What ``--mode sample`` and ``--mode eval`` do with a trained model: the paper's experiments and sample-quality metrics.

It imports the library; of the library only the command-line entry points
(``main``, ``editing_cli``, ``convert``) import it, for :mod:`.runtime`'s
checkpoint restore and the ``--mode eval`` driver.

* the driver: :mod:`.evaluate` (``--mode eval``, the parts named by
  ``eval.parts``) and :mod:`.samples` (``--mode sample`` and the sample sets
  the metrics score); :mod:`.runtime` restores a checkpoint's EMA parameters
  and shards batches for all of them;
* the paper's experiments: :mod:`.bits_per_dim` (Table 2, eq. 5),
  :mod:`.rate_distortion` (§4.3, Fig. 5), :mod:`.figures` (Figs. 6-9);
* the continuous-time view: :mod:`.ode_bpd` (bits/dim under the
  probability-flow ODE), :mod:`.nfe_curve` (quality per model call);
* sample quality: :mod:`.metrics` (Fréchet distance, Inception Score),
  :mod:`.kernel_distance` (KID), :mod:`.fid` with the Inception port
  (:mod:`.inception`, its weights in :mod:`.inception_weights`), and the offline
  digits metric :mod:`.classifier_metrics` in the feature space of
  :mod:`.classifier`; :mod:`.guidance_sweep` (guidance scale curve).
"""
