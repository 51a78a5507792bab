from tests.agent.harness import agent, node

__all__ = ["agent", "node"]
