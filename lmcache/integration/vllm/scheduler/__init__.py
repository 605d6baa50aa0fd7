"""The scheduler half of the connector (vLLM's EngineCore process): lookups, admission,
leases, each step's plan of loads and saves. connector.SchedulerConnector composes the rest."""
