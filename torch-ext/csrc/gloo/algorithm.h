// Stands in for Gloo's <gloo/algorithm.h> (see README.md).
#pragma once
#include "declarations.h"
