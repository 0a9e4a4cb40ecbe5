"""A client behaviour ("slow") whose client ``slow_cid`` takes ``delay_s`` longer to
train in round ``slow_round``: a straggler past the round timeout, for the deployment
test (its late reply must cost it that round only)."""

import time
from typing import Literal

from clients.behaviour import SgdClient
from fedsim.client_params import CLIENTS


@CLIENTS.register("slow")
class SlowClient(SgdClient):
    behaviour: Literal["slow"] = "slow"
    slow_cid: int = 1
    slow_round: int = 2
    delay_s: float = 5.0

    def train(self, task):
        if task.cid == self.slow_cid and task.server_round == self.slow_round:
            time.sleep(self.delay_s)
        return super().train(task)
