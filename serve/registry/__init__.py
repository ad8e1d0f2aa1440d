"""The cluster-wide adapter registry: persisted state (``state``), the actor (``core``) and the
client every replica uses (``client``)."""
