"""The scanning library: what every scanner runs in process (MIME reading, container
expansion, the engines, Skeptic, the pipeline and its verdicts). It imports nothing of the
daemons, and the ``mailtower scan`` command uses it without any of them."""
