"""Negative control for the replica check: the real trainer, except that the D update
calls D's unwrapped module, so DDP never all-reduces D's gradients. The ranks' Ds must
then drift apart and train.py's end-of-run replica check must fail."""
from accelerate import Accelerator

from pipeline import train

real_train_step = train.train_step


def train_step_skipping_d_allreduce(G, D, *args, **kwargs):
    return real_train_step(G, Accelerator().unwrap_model(D), *args, **kwargs)


train.train_step = train_step_skipping_d_allreduce

if __name__ == "__main__":
    train.run_and_exit()
