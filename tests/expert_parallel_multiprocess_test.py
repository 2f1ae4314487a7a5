"""Multi-process expert parallelism: 2 processes x 4 virtual CPU devices on
localhost (coordinator 127.0.0.1, Gloo collectives; the path of a multi-host
GPU or TPU job: `tf_moe.sharding.initialize`) train the Transformer-MoE of
expert_parallel_worker.py 3 steps on a batch:2,expert:4 mesh, each process
feeding its share of every batch, and must give the losses of 1 process x 8
devices on the same mesh and batches."""

import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np
from absl.testing import absltest, parameterized

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expert_parallel_worker.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiProcessTest(parameterized.TestCase):
    def run_workers(self, tmp, dispatch, num_processes, devices):
        port = free_port()
        procs = []
        for process_id in range(num_processes):
            out = os.path.join(tmp, f"{dispatch}_{num_processes}_{process_id}.json")
            command = [sys.executable, WORKER, "--dispatch", dispatch,
                       "--num_processes", str(num_processes), "--process_id", str(process_id),
                       "--devices", str(devices), "--port", str(port), "--out", out]
            procs.append((subprocess.Popen(command, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), out))
        results = []
        for proc, out in procs:
            log, _ = proc.communicate(timeout=400)
            self.assertEqual(proc.returncode, 0, log[-3000:])
            with open(out) as f:
                results.append(json.load(f)["losses"])
        return results

    @parameterized.named_parameters(("custom_call", "custom_call"), ("einsum", "einsum"))
    def test_two_processes_match_one(self, dispatch):
        with tempfile.TemporaryDirectory() as tmp:
            (single,) = self.run_workers(tmp, dispatch, 1, 8)
            pair = self.run_workers(tmp, dispatch, 2, 4)
        self.assertLess(single[-1], single[0])
        for losses in pair:  # every process reports the global loss
            np.testing.assert_allclose(losses, single, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    absltest.main()
