"""Off-the-shelf pretrained face models, embedded so they can sit in the same tables as ours.

:mod:`.dlib_resnet`: dlib's ResNet-29 face descriptor (128-D), run with dlib's own
recipe (HOG detector, 5-point shape predictor, 150x150 face chip) on the original
images. Optional: needs ``pip install -r requirements-dlib.txt``.
"""
