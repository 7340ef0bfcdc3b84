"""ServerApp: FedAvg, wrapped so that a client can be forgotten, run by Flower's own Strategy.start()."""

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fed_unlearn.flower import Unlearning

from .task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    torch.manual_seed(0)
    strategy = Unlearning(FedAvg(fraction_train=1.0, min_available_nodes=2), method="puf")
    # the client whose node config says partition-id = forget-partition asks to be forgotten
    strategy.request_unlearning(int(rc["forget-partition"]), round=int(rc["forget-round"]))
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=int(rc["num-server-rounds"])
    )
    print(
        f"forgot nodes {sorted(strategy.departed)}; final accuracy of the others: "
        f"{result.evaluate_metrics_clientapp[int(rc['num-server-rounds'])]['eval_acc']:.3f}"
    )
