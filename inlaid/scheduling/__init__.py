"""Multi-task scheduling policies, the step-time cost model, workloads and the simulator. Torch-free."""
