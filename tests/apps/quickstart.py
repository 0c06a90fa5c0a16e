"""A Flower app written the way Flower's PyTorch quickstart writes one (no tinyfleet import).

The engine tests run it unchanged on tinyfleet's engine.
"""

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from sklearn.datasets import load_digits
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def load_data(partition_id: int, num_partitions: int):
    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.arange(len(x))[partition_id::num_partitions]
    return torch.from_numpy(x[idx]), torch.from_numpy(y[idx])


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    opt = torch.optim.SGD(model.parameters(), lr=float(context.run_config.get("lr", 0.1)))
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    # Context.state follows the node: count the trainings this node has done.
    seen = context.state.get("counter", MetricRecord({"n": 0}))
    seen["n"] = int(seen["n"]) + 1
    context.state["counter"] = seen
    metrics = MetricRecord({"train_loss": float(loss), "num-examples": len(x),
                            "times-trained": int(seen["n"])})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    metrics = MetricRecord({"eval_acc": acc, "num-examples": len(x)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


server_app = ServerApp()
RESULTS: dict = {}


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config.get("num-server-rounds", 3))
    strategy = FedAvg(fraction_train=0.5, fraction_evaluate=0.5, min_available_nodes=2)
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(Net().state_dict()), num_rounds=num_rounds
    )
    RESULTS["result"] = result
