"""The paper's reproduction, shared by the scripts in examples/: networks (`models`), dataset readers
and the offline datasets (`data`), the compared methods and the training loop (`training`), and the
tables and plots in the paper's layouts (`reporting`). It uses crl_ops through its public API only;
it is not part of the installed package."""
