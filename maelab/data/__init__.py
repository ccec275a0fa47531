"""Data: image folders (`folders`), augmentation (`transforms`), the in-RAM fast path (`memory`) and
the step-sharded feeding used by every command (`loader`)."""
