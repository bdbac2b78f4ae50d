"""Tamiyo: the Kasmina fleet's controller (DESIGN §5).

    policy = HeuristicPolicy(PolicyConfig(), KarnAdvisor("127.0.0.1:50053", 1.0, ...))
    controller = Controller(policy, DeliveryConfig())
    commands = controller.decide(view, time.time())    # view: a JobView built from the bus
"""

from tamiyo.blueprints import BlueprintAdvisor, BlueprintChoice, KarnAdvisor
from tamiyo.controller import Controller, DeliveryConfig
from tamiyo.heuristics import HealthWeights
from tamiyo.policy import HeuristicPolicy, Policy, PolicyConfig
from tamiyo.settings import TamiyoSettings
from tamiyo.view import JobView, SeedView

__all__ = [
    "BlueprintAdvisor", "BlueprintChoice", "Controller", "DeliveryConfig", "HealthWeights",
    "HeuristicPolicy", "JobView", "KarnAdvisor", "Policy", "PolicyConfig", "SeedView",
    "TamiyoSettings",
]
