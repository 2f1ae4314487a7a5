"""Tests for tf_moe.ops.plan: the one resolver of a layer call's dispatch path,
dropless mode and capacity, and the layers reading their path from it.

Every row of the "auto" table in plan.py's docstring is checked, with the
custom-call libraries built (data deps) and with them reported missing
(mocked), on CPU and with the platform reported as TPU (mocked); a None
capacity factor that cannot run dropless must warn, naming the setting.
"""

import warnings
from unittest import mock

import keras
import numpy as np
from absl.testing import absltest
from absl.testing import parameterized

from tf_moe.layers import HierarchicalMoE, MoE
from tf_moe.ops import custom_call, dropless, grouped_matmul
from tf_moe.ops import plan as plan_lib
from tf_moe.ops.library import CustomCallUnavailableError
from tf_moe.routing import ExpertChoiceRouter, TopKRouter

E, D, H = 4, 8, 16


def resolve(*args, **kwargs):
    """(plan, [warning messages]) of resolve_plan(*args, **kwargs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_lib.resolve_plan(*args, **kwargs)
    return plan, [str(w.message) for w in caught if w.category is RuntimeWarning]


class ResolvePlanTest(parameterized.TestCase):
    def test_auto_on_cpu_with_the_libraries(self):
        plan, warned = resolve("auto", 1.25)
        self.assertEqual((plan.path, plan.dropless), ("custom_call", False))
        self.assertEqual(plan.capacity(16, E, 2, 1), 10)  # ceil(1.25 * 16 * 2 / 4)
        plan, warned = resolve("auto", None)
        self.assertEqual((plan.path, plan.dropless, plan.grouped_matmul),
                         ("custom_call", True, "custom_call"))
        self.assertTrue(plan.row_kernels)
        self.assertEqual(plan.capacity(16, E, 2, 1), 16)  # nothing can overflow
        self.assertEqual(warned, [])
        self.assertIn("dropless", plan.reason)

    @parameterized.named_parameters(("einsum", "einsum"), ("gather", "gather"))
    def test_explicit_pure_path_keeps_c_equals_s_without_warning(self, path):
        plan, warned = resolve(path, None)
        self.assertEqual((plan.path, plan.dropless), (path, False))
        self.assertEqual(plan.capacity(16, E, 2, 1), 16)
        self.assertEqual(warned, [])

    def test_explicit_custom_call(self):
        plan, _ = resolve("custom_call", 2.0)
        self.assertEqual((plan.path, plan.dropless), ("custom_call", False))
        plan, _ = resolve("custom_call", None)
        self.assertTrue(plan.dropless)
        # Expert choice: the capacity is the routing rule, so None is C = S.
        plan, warned = resolve("custom_call", None, token_choice=False)
        self.assertEqual((plan.path, plan.dropless), ("custom_call", False))
        self.assertEqual(warned, [])

    def test_auto_without_the_custom_call_library_warns_for_none(self):
        with mock.patch.object(custom_call, "is_available", return_value=False):
            plan, warned = resolve("auto", 1.25)
            self.assertEqual((plan.path, plan.dropless), ("gather", False))
            self.assertEqual(warned, [])
            plan, warned = resolve("auto", None, capacity_name="eval_capacity_factor")
        self.assertEqual((plan.path, plan.dropless), ("gather", False))
        self.assertLen(warned, 1)
        self.assertIn("eval_capacity_factor=None with dispatch='auto'", warned[0])
        self.assertIn("C = S", warned[0])

    def test_auto_without_the_grouped_matmul_library_warns_for_none(self):
        with mock.patch.object(grouped_matmul, "is_available", return_value=False):
            plan, warned = resolve("auto", None)
        self.assertEqual((plan.path, plan.dropless), ("custom_call", False))
        self.assertLen(warned, 1)
        self.assertIn("grouped-matmul library is not built", warned[0])

    def test_auto_on_tpu_is_einsum(self):
        with mock.patch.object(plan_lib, "_platform", return_value="tpu"):
            plan, warned = resolve("auto", 1.0)
            self.assertEqual((plan.path, warned), ("einsum", []))
            plan, warned = resolve("auto", None)
        self.assertEqual((plan.path, plan.dropless), ("einsum", False))
        self.assertLen(warned, 1)
        self.assertIn("TPU", warned[0])

    def test_no_warning_where_none_means_c_equals_s_by_design(self):
        # Expert choice, and a layer without a row path (hierarchical MoE).
        with mock.patch.object(custom_call, "is_available", return_value=False):
            for kwargs in (dict(token_choice=False), dict(rows=False)):
                plan, warned = resolve("auto", None, **kwargs)
                self.assertEqual((plan.dropless, warned), (False, []), kwargs)

    def test_requested_custom_call_without_library_raises(self):
        error = CustomCallUnavailableError("needs libtf_moe_ops.so ... bazel build")
        with mock.patch.object(custom_call, "require_available", side_effect=error):
            with self.assertRaisesRegex(RuntimeError, "bazel build"):
                resolve("custom_call", 1.0)
        with mock.patch.object(grouped_matmul, "require_available", side_effect=error):
            self.assertFalse(resolve("custom_call", 1.0)[0].dropless)
            with self.assertRaisesRegex(RuntimeError, "bazel build"):
                resolve("custom_call", None)

    def test_unknown_dispatch_names_the_argument(self):
        with self.assertRaisesRegex(ValueError, "`dispatch` must be one of .*dispatch='scatter'"):
            resolve("scatter", 1.0)


class LayersReadThePlanTest(parameterized.TestCase):
    def test_moe_plan_per_mode(self):
        moe = MoE(E, H, capacity_factor=1.5, eval_capacity_factor=None, dispatch="auto")
        self.assertFalse(moe.runs_dropless(training=True))
        self.assertTrue(moe.runs_dropless(training=False))
        self.assertEqual(moe.plan(True).capacity_factor, 1.5)
        self.assertEqual(moe.capacity(8, training=True), 6)  # ceil(1.5 * 8 * 2 / 4)
        self.assertEqual(moe.capacity(8, training=False), 8)
        expert_choice = MoE(E, H, router=ExpertChoiceRouter(), capacity_factor=None)
        self.assertFalse(expert_choice.runs_dropless(training=True))

    def test_call_takes_the_planned_path(self):
        """The layer runs what `plan` says, once per call: the rows path when
        dropless, the plan's dispatch otherwise."""
        x = np.random.default_rng(0).normal(size=(2, 8, D)).astype(np.float32)
        moe = MoE(E, H, router=TopKRouter(k=2), capacity_factor=None,
                  eval_capacity_factor=1.0, group_size=8)
        moe.build(x.shape)
        with mock.patch.object(plan_lib, "resolve_plan", wraps=plan_lib.resolve_plan) as spy, \
                mock.patch.object(dropless, "dispatch_rows", wraps=dropless.dispatch_rows) as rows:
            moe(x, training=True)
            self.assertEqual((spy.call_count, rows.call_count), (1, 1))
            moe(x, training=False)
            self.assertEqual((spy.call_count, rows.call_count), (2, 1))

    def test_layer_warns_where_auto_cannot_run_dropless(self):
        x = np.ones((2, 4, D), np.float32)
        moe = MoE(E, H, capacity_factor=None, group_size=8)
        with mock.patch.object(custom_call, "is_available", return_value=False), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            moe(x, training=True)
            self.assertFalse(moe.runs_dropless(training=True))
        messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
        self.assertTrue(any("capacity_factor=None" in m for m in messages), messages)

    def test_hierarchical_never_runs_rows(self):
        layer = HierarchicalMoE(2, 2, H, capacity_factor=None, dispatch="custom_call")
        self.assertFalse(layer.plan(True).dropless)
        self.assertEqual(layer.plan(True).path, "custom_call")


if __name__ == "__main__":
    absltest.main()
