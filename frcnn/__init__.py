"""frcnn: Faster R-CNN (ResNet-50-C4) on Keras 3 with the TensorFlow backend."""
