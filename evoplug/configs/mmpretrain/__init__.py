# evoplug's MMPretrain base configs (old-style mmengine configs). A package only so that the
# package build ships them with evoplug; see evoplug/configs/__init__.py for how to include them.
