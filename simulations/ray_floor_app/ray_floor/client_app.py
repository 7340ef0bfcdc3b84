"""A ClientApp that imports torch and takes one SGD step per message: what any PyTorch ClientApp pays."""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def step(msg: Message, context: Context) -> Message:
    """One SGD step of a linear model (building the optimizer imports what torch leaves to it)."""
    torch.set_num_threads(1)
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.ones(8, 4)).square().mean()
    loss.backward()
    opt.step()
    return Message(RecordDict({"m": MetricRecord({"loss": float(loss.detach())})}), reply_to=msg)
