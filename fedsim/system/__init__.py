"""Cross-device realism: device profiles and availability (``devices``); the clock itself is
``fedsim.engine.clock``. Torch-free and Flower-free, so ``fedsim validate`` can check a ``[system]`` section."""
