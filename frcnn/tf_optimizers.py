"""The optimizers of the TensorFlow backend: Keras' SGD, Adam and loss-scale optimizer, with the replicas' shared
decisions under ``tf.distribute`` (:class:`frcnn.tf_distribute.ReplicaConsistentApply`) and, where
``fused_kernels`` is on, each variable's update as one fused TensorFlow kernel (``ResourceApply*``, the same
formulas) instead of Keras' several elementwise passes. The fused kernels are a speed path measured on a CPU
(``train.speed_paths``; figures in docs/NOTES.md); :func:`frcnn.optim.make_optimizer` chooses.

Owns: TensorFlow's optimizer kernels. Imports TensorFlow; imported only on the TensorFlow backend.
"""

import keras
import tensorflow as tf

from frcnn.optim import WeightDecayGroups
from frcnn.tf_distribute import ReplicaConsistentApply


def _fused_kernel_applies(optimizer, gradient, variable):
    """Whether a variable's update can be one fused kernel: asked for, a resource variable (Keras hands
    ``update_step`` the backend variable) and a dense gradient."""
    return optimizer.fused_kernels and hasattr(variable, "handle") and not isinstance(gradient, tf.IndexedSlices)


def _handle(slot):
    # A slot is a Keras variable; its backend variable (or, under tf.distribute, this replica's component of it
    # inside the strategy's update call) owns the resource handle the kernels update in place.
    return slot.value.handle


class _Fused:
    def __init__(self, *args, fused_kernels=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused_kernels = bool(fused_kernels)

    def get_config(self):
        return {**super().get_config(), "fused_kernels": self.fused_kernels}


class _FusedSGD(_Fused, keras.optimizers.SGD):
    """Keras' SGD. With momentum and ``fused_kernels``, each variable's update is one kernel (the same formula:
    ``m = momentum * m - lr * g``, ``w += m``, or Nesterov's)."""

    def update_step(self, gradient, variable, learning_rate):
        if not self.momentum or not _fused_kernel_applies(self, gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=variable.handle, accum=_handle(self.momentums[self._get_variable_index(variable)]),
            lr=tf.cast(learning_rate, dtype), grad=tf.cast(gradient, dtype),
            momentum=tf.constant(self.momentum, dtype), use_nesterov=self.nesterov)


class _FusedAdam(_Fused, keras.optimizers.Adam):
    """Keras' Adam. With ``fused_kernels``, each variable's update is one kernel (the same formula, Kingma & Ba's
    with epsilon added to ``sqrt(v)``) instead of ten elementwise passes over the variable and its two slots."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _fused_kernel_applies(self, gradient, variable):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(tf.constant(self.beta_1, dtype), step),
            beta2_power=tf.pow(tf.constant(self.beta_2, dtype), step),
            lr=tf.cast(learning_rate, dtype), beta1=tf.constant(self.beta_1, dtype),
            beta2=tf.constant(self.beta_2, dtype), epsilon=tf.constant(self.epsilon, dtype),
            grad=tf.cast(gradient, dtype))


@keras.saving.register_keras_serializable(package="frcnn", name="TFSGD")
class SGD(ReplicaConsistentApply, WeightDecayGroups, _FusedSGD):
    """The training SGD on TensorFlow: replica-consistent ``apply``, weight decay per group
    (:class:`frcnn.optim.WeightDecayGroups`, which runs first), then the fused update (:class:`_FusedSGD`; in
    coupled mode torch's momentum form as one ``ResourceApplyMomentum``)."""

    def _torch_momentum_step(self, gradient, variable, velocity, lr):
        if not _fused_kernel_applies(self, gradient, variable):
            return super()._torch_momentum_step(gradient, variable, velocity, lr)
        tf.raw_ops.ResourceApplyMomentum(var=variable.handle, accum=_handle(velocity), lr=lr, grad=gradient,
                                         momentum=tf.constant(self.momentum, variable.dtype),
                                         use_nesterov=self.nesterov)


@keras.saving.register_keras_serializable(package="frcnn", name="TFAdam")
class Adam(ReplicaConsistentApply, WeightDecayGroups, _FusedAdam):
    """The training Adam on TensorFlow: replica-consistent ``apply``, weight decay per group, fused update."""


@keras.saving.register_keras_serializable(package="frcnn")
class LossScaleOptimizer(ReplicaConsistentApply, keras.optimizers.LossScaleOptimizer):
    pass
