"""Operations tooling that is not the service: ``ops.k8s`` generates k8s/ from deploy/."""
